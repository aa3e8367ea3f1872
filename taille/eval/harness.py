"""Run zero-shot tasks with lm-evaluation-harness on a model already in memory."""

from __future__ import annotations

import logging

from taille.errors import TailleError
from taille.eval.tasks import LOCAL_TASKS, local_task_config
from taille.models.precision import autocast

log = logging.getLogger(__name__)

HEADLINE = {"acc_norm": 0, "acc": 1, "perplexity": 2}
"""Which metric a task's column shows: acc_norm where the task has it (ARC, PIQA, HellaSwag), else acc."""


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise TailleError("zero-shot tasks need lm-evaluation-harness: pip install 'taille[eval]'") from None
    return lm_eval


def check_tasks(tasks: list[str], task_data: str | None) -> None:
    """Fail before any model loads when a task is unknown or lm-eval is missing."""
    _lm_eval()
    if task_data is not None:
        unknown = [t for t in tasks if t not in LOCAL_TASKS]
        if unknown:
            raise TailleError(f"unknown task {', '.join(unknown)}; with --task-data taille knows: {', '.join(LOCAL_TASKS)}")
        return
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise TailleError(f"unknown task {', '.join(unknown)} (lm-eval knows {len(known)} tasks, e.g. "
                          f"{', '.join(LOCAL_TASKS)}; `lm_eval --tasks list` lists them all)")


def run_tasks(model, tokenizer, tasks: list[str], task_data: str | None = None, limit: int | None = None,
              num_fewshot: int = 0, batch_size: int = 8, precision: str = "fp32", seed: int = 1234,
              log_samples: bool = False) -> dict:
    """Scores {task: {metric: value}} plus the record lm-eval and taille keep beside them
    ('versions', 'n_samples', 'config'); per-example outputs under 'samples' when asked."""
    check_tasks(tasks, task_data)
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    specs, sizes = [], {}
    for name in tasks:
        if task_data is None:
            specs.append(name)
            continue
        config, sizes[name] = local_task_config(name, task_data)
        specs.append(config)
        if limit is not None and limit > sizes[name]:
            log.warning("--limit %d is more than %s's %d examples: using the whole task", limit, name, sizes[name])
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    device = next(model.parameters()).device
    with autocast(precision, device.type):
        out = lm_eval.simple_evaluate(
            model=lm, tasks=specs, num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
            bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed, verbosity="WARNING",
        )
    scores = {}
    for name in tasks:
        metrics = out["results"][name]
        scores[name] = {k.split(",")[0]: v for k, v in metrics.items()
                        if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
        scores[name].update({k.split(",")[0]: v for k, v in metrics.items() if k.split(",")[0].endswith("_stderr")
                             and isinstance(v, (int, float))})
    record = {
        "scores": scores,
        "versions": {name: out["versions"].get(name) for name in tasks},
        "n_samples": {name: out.get("n-samples", {}).get(name) for name in tasks},
        "config": {"lm_eval": _version("lm_eval"),
                   "num_fewshot": num_fewshot, "limit": limit, "seed": seed, "batch_size": batch_size,
                   "precision": precision, "task_data": task_data, "task_definitions": "taille" if task_data else "lm-eval"},
    }
    if log_samples:
        record["samples"] = out["samples"]
    return record


def headline(metrics: dict) -> tuple[str, float]:
    """(metric name, value) a table shows for one task."""
    name = min((m for m in metrics if m in HEADLINE), key=HEADLINE.get)
    return name, metrics[name]


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
