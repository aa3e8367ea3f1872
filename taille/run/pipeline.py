"""`taille run RECIPE.yaml`: teacher correction -> importance -> search -> prune -> distil -> evaluate ->
report, each stage writing one folder of the run and skipped when its output is already there. A killed
run started again resumes: finished stages are not redone, and a distillation continues from its last
checkpoint exactly.

RUN/recipe.yaml        the recipe as given (a run folder refuses a different one)
RUN/corrected/         the corrected teacher (when the recipe has `correct`)
RUN/personas/, RUN/roleplay/, RUN/hostile/, RUN/baits/, RUN/knowledge/   cards and the teacher's role-play /
                       answers to hostile lines / to lines that bait each card's `never` phrases / to questions
                       about the cards' facts
RUN/importance/        scores + figures
RUN/search/            leaderboard.{md,json,png}, one folder per candidate
RUN/pruned/            the pruned student (standard HF folder)
RUN/distilled/         the distilled student, checkpoints, metrics, curves
RUN/sft/               the distilled student after a second training stage (when the recipe has `sft`)
RUN/preferred/         the trained student after DPO on its own broken replies (when the recipe has `prefer`)
RUN/eval/              teacher vs pruned vs distilled
RUN/export/            GGUF files of the distilled student, verified in llama.cpp (when the recipe has `export`)
RUN/report.md, RUN/report.html
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

from taille.errors import TailleError
from taille.run import recipe as R

log = logging.getLogger(__name__)

STAGES = ("personas", "roleplay", "hostile", "baits", "knowledge", "correct", "importance", "search", "prune", "distill", "sft", "prefer", "eval",
          "export", "report")
DONE = {"personas": "personas/cards.json", "roleplay": "roleplay/done.json", "hostile": "hostile/done.json",
        "baits": "baits/done.json", "knowledge": "knowledge/done.json",
        "correct": "corrected/taille.json", "importance": "importance/importance.json",
        "search": "search/leaderboard.json", "prune": "pruned/taille.json", "distill": "distilled/taille.json",
        "sft": "sft/taille.json", "prefer": "preferred/taille.json", "eval": "eval/eval.json", "export": "export/export.json",
        "report": "report.md"}
OPTIONAL = {"personas": "personas", "roleplay": "roleplay", "hostile": "hostile", "baits": "baits", "knowledge": "knowledge", "correct": "correct", "search": "search",
            "sft": "sft", "prefer": "prefer", "export": "export"}
"""Stages that run only when the recipe has their section."""


def _check_same_recipe(run: Path, recipe: R.Recipe, raw: dict) -> None:
    import yaml

    stored = run / "recipe.yaml"
    if stored.is_file():
        before = yaml.safe_load(stored.read_text())
        if before != raw:
            changed = sorted(k for k in set(before) | set(raw) if before.get(k) != raw.get(k))
            raise TailleError(f"{run} holds a run of another recipe (sections that differ: {', '.join(changed)}); "
                              "give another --out, or delete the stages to redo")
    else:
        run.mkdir(parents=True, exist_ok=True)
        stored.write_text(yaml.safe_dump(raw, sort_keys=False))


def run_recipe(recipe: R.Recipe, raw: dict, out: str | None = None, until: str | None = None) -> Path:
    """Run every stage not yet done; returns the run folder."""
    if until is not None and until not in STAGES:
        raise TailleError(f"--until {until}: use one of {', '.join(STAGES)}")
    run = recipe.run_dir(out)
    _check_same_recipe(run, recipe, raw)
    timings = _load_json(run / "timings.json") or {}
    teacher = str(run / "corrected") if recipe.correct else recipe.teacher
    for stage in STAGES:
        if stage in OPTIONAL and not getattr(recipe, OPTIONAL[stage]):
            continue
        if (run / DONE[stage]).exists() and stage != "report":
            log.info("stage %s: done already (%s)", stage, run / DONE[stage])
        else:
            log.info("stage %s ...", stage)
            started = time.perf_counter()
            STAGE_FUNCTIONS[stage](recipe, run, teacher)
            # a stage that runs again did not finish before (a resumed distillation): its times add up
            timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - started, 1)
            (run / "timings.json").write_text(json.dumps(timings, indent=1))
        if stage == until:
            break
    return run


def _load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def stage_personas(recipe, run: Path, teacher: str) -> None:
    from taille.characters.cards import write_cards
    from taille.characters.settings import CardSettings

    cfg = CardSettings(out=str(run / "personas"), **recipe.personas)
    counts = write_cards(cfg.out, cfg.count, cfg.seed)
    (run / "personas" / "cards.json").write_text(json.dumps({"count": cfg.count, "seed": cfg.seed, **counts}) + "\n")


def stage_roleplay(recipe, run: Path, teacher: str, section: str = "roleplay") -> None:
    from taille.characters.roleplay import generate_roleplay

    meta = generate_roleplay(R.run_file_settings(recipe, section, recipe.teacher, run))
    (run / DONE[section]).write_text(json.dumps(meta, indent=1) + "\n")


def stage_correct(recipe, run: Path, teacher: str) -> None:
    from taille.distill.train import distill

    distill(R.correct_config(recipe, str(run / "corrected"), run).distill_config())


def stage_importance(recipe, run: Path, teacher: str) -> None:
    from taille.prune.prune import run_importance

    run_importance(R.importance_config(recipe, teacher, str(run / "importance"), run))


def stage_search(recipe, run: Path, teacher: str) -> None:
    from taille.search.search import SearchSettings, run_search

    settings = SearchSettings(**{k: v for k, v in recipe.search.items()})
    run_search(teacher, R.data_spec(recipe, run), run / "importance", settings, run / "search")


def stage_prune(recipe, run: Path, teacher: str) -> None:
    from taille.prune.prune import run_prune

    board = _load_json(run / "search" / "leaderboard.json") if recipe.search else None
    run_prune(R.prune_config(recipe, teacher, str(run / "pruned"), str(run / "importance"),
                             shape=board["winner"]["shape"] if board else None))


def stage_distill(recipe, run: Path, teacher: str) -> None:
    from taille.distill.train import distill

    distill(R.distill_config(recipe, str(run / "pruned"), str(run / "distilled"), teacher=teacher, run=run))


def stage_sft(recipe, run: Path, teacher: str) -> None:
    from taille.distill.train import distill

    distill(R.sft_config(recipe, str(run / "distilled"), str(run / "sft"), teacher=teacher, run=run))


def stage_prefer(recipe, run: Path, teacher: str) -> None:
    from taille.characters.prefer import prefer

    prefer(R.prefer_settings(recipe, str(R.trained_student(recipe, run)), str(run / "preferred"), run))


def stage_eval(recipe, run: Path, teacher: str) -> None:
    from taille.eval.run import evaluate, write_report

    stages = ["pruned", "distilled"] + (["sft"] if recipe.sft is not None else []) + \
        (["preferred"] if recipe.prefer is not None else [])
    models = [teacher, *(str(run / stage) for stage in stages)]
    report = evaluate(models, R.eval_settings(recipe, run, teacher), out=run / "eval")
    report["labels"] = {teacher: "teacher", **{str(run / stage): stage for stage in stages}}
    write_report(report, run / "eval")


def stage_export(recipe, run: Path, teacher: str) -> None:
    from taille.export.gguf import export_gguf
    from taille.export.verify import verify_gguf

    student, records = str(R.final_student(recipe, run)), []
    for quant in R.export_quants(recipe):
        cfg = R.export_settings(recipe, str(run / "export" / f"{recipe.name}-{quant}.gguf"), quant)
        record = export_gguf(student, cfg.out, quant, name=recipe.name, pre_tokenizer=cfg.pre_tokenizer)
        if cfg.verify:
            v = record["verify"] = verify_gguf(record["out"], student, cfg.verify_data, cfg.verify_blocks,
                                               cfg.verify_len, quant=quant)
            if not v["passed"]:
                log.warning("%s: the llama.cpp file is further from PyTorch than a correct %s export: %s", record["out"],
                            quant, v.get("failed", v))
        records.append(record)
    (run / "export" / "export.json").write_text(json.dumps(records, indent=1))


def stage_report(recipe, run: Path, teacher: str) -> None:
    from taille.run.report import write_run_report

    write_run_report(recipe, run, teacher)


STAGE_FUNCTIONS = {"personas": stage_personas, "roleplay": stage_roleplay,
                   **{section: functools.partial(stage_roleplay, section=section)  # the other run files: one stage
                      for section in ("hostile", "baits", "knowledge")},
                   "correct": stage_correct, "importance": stage_importance, "search": stage_search, "prune": stage_prune,
                   "distill": stage_distill, "sft": stage_sft, "prefer": stage_prefer, "eval": stage_eval,
                   "export": stage_export, "report": stage_report}
