"""Zero-shot tasks through lm-evaluation-harness, online or from local files.

Online, a task name goes to lm-eval's own registry (its datasets come from the Hub). Offline,
`--task-data DIR` points at local copies of the official files (the layout of ../shared/data/eval:
`arc_easy/ARC-Easy-Test.jsonl`, `piqa/valid.jsonl` + `valid-labels.lst`, ...): each is converted once to the
record shape of the Hub dataset lm-eval expects, and the task runs from a config that repeats lm-eval's
own prompt, choices, target and metrics for that task, with `dataset_path: json` on the converted file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from taille.errors import TailleError
from taille.paths import cache_dir

log = logging.getLogger(__name__)

TASK_VERSION = "taille-local-1"
"""Version of these local definitions (each mirrors lm-eval's task of metadata version 1.0)."""

ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
ACC_NORM = ACC + [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


def _jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _arc(paths):
    for r in _jsonl(paths[0]):
        choices = r["question"]["choices"]
        yield {"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
               "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}}


def _piqa(paths):
    labels = [int(x) for x in Path(paths[1]).read_text().split()]
    for r, label in zip(_jsonl(paths[0]), labels, strict=True):
        yield {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": label}


def _hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow bracket tags out, double spaces folded."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(paths):
    for r in _jsonl(paths[0]):
        yield {"query": _hellaswag_text(r["query_lmeval_approx"]), "choices": [_hellaswag_text(e) for e in r["endings"]],
               "label": int(r["label"])}


def _same(paths):
    yield from _jsonl(paths[0])


def _boolq(paths):
    for r in _jsonl(paths[0]):
        yield {"passage": r["passage"], "question": r["question"], "label": int(r["answer"])}


def _sciq(paths):
    yield from json.loads(Path(paths[0]).read_text())


def _winogrande_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def _winogrande_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def _winogrande_choices(doc):
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + option for option in (doc["option1"], doc["option2"])]


def _copa_choice(text: str) -> str:
    return " " + text[0].lower() + text[1:]


def _copa_text(doc):
    return doc["premise"].strip()[:-1] + " " + {"cause": "because", "effect": "therefore"}[doc["question"]]


def _copa_target(doc):
    return _copa_choice(doc["choice1"] if doc["label"] == 0 else doc["choice2"])


def _copa_choices(doc):
    return [_copa_choice(doc["choice1"]), _copa_choice(doc["choice2"])]


@dataclass(frozen=True)
class LocalTask:
    files: tuple[str, ...]
    """Paths under --task-data."""
    convert: Callable
    """files -> records in the shape of the Hub dataset lm-eval reads."""
    split: str
    """The split lm-eval scores: 'test' or 'validation'."""
    config: dict = field(default_factory=dict)
    """lm-eval task fields: prompt, target, choices, metrics."""


MC = {"output_type": "multiple_choice"}
LOCAL_TASKS: dict[str, LocalTask] = {
    "arc_easy": LocalTask(("arc_easy/ARC-Easy-Test.jsonl",), _arc, "test", {
        **MC, "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}", "metric_list": ACC_NORM}),
    "arc_challenge": LocalTask(("arc_challenge/ARC-Challenge-Test.jsonl",), _arc, "test", {
        **MC, "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}", "metric_list": ACC_NORM}),
    "piqa": LocalTask(("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa, "validation", {
        **MC, "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}", "metric_list": ACC_NORM}),
    "winogrande": LocalTask(("winogrande/dev.jsonl",), _same, "validation", {
        **MC, "doc_to_text": _winogrande_text, "doc_to_target": _winogrande_target,
        "doc_to_choice": _winogrande_choices, "metric_list": ACC}),
    "hellaswag": LocalTask(("hellaswag/hellaswag_val.jsonl",), _hellaswag, "validation", {
        **MC, "doc_to_text": "{{query}}", "doc_to_target": "{{label}}", "doc_to_choice": "choices",
        "metric_list": ACC_NORM}),
    "lambada_openai": LocalTask(("lambada_openai/lambada_test.jsonl",), _same, "test", {
        "output_type": "loglikelihood", "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}] + ACC}),
    "boolq": LocalTask(("boolq/dev.jsonl",), _boolq, "validation", {
        **MC, "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
        "doc_to_choice": ["no", "yes"], "metric_list": ACC}),
    "copa": LocalTask(("copa/val.jsonl",), _same, "validation", {
        **MC, "doc_to_text": _copa_text, "doc_to_target": _copa_target, "doc_to_choice": _copa_choices,
        "metric_list": ACC}),
    "openbookqa": LocalTask(("openbookqa/openbookqa_main_test.jsonl",), _same, "test", {
        **MC, "doc_to_text": "{{question_stem}}", "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
        "doc_to_choice": "{{choices.text}}", "metric_list": ACC_NORM}),
    "sciq": LocalTask(("sciq/test.json",), _sciq, "test", {
        **MC, "doc_to_text": "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:", "doc_to_target": 3,
        "doc_to_choice": "{{[distractor1, distractor2, distractor3, correct_answer]}}", "metric_list": ACC_NORM}),
}


def prepare_local(name: str, task_data: str | Path) -> tuple[Path, int]:
    """Convert a task's local files once into the cache; return (jsonl path, number of examples)."""
    if name not in LOCAL_TASKS:
        raise TailleError(f"unknown task '{name}'; with --task-data taille knows: {', '.join(LOCAL_TASKS)}")
    task, root = LOCAL_TASKS[name], Path(task_data).expanduser()
    paths = [root / f for f in task.files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TailleError(f"task {name}: local data not found; looked for {', '.join(missing)}")
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)
    out = cache_dir("tasks") / f"{name}-{TASK_VERSION}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}.jsonl"
    if not out.is_file():
        tmp = out.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for record in task.convert(paths):
                f.write(json.dumps(record) + "\n")
        tmp.replace(out)
    with open(out, encoding="utf-8") as f:
        n = sum(1 for _ in f)
    return out, n


def local_task_config(name: str, task_data: str | Path) -> tuple[dict, int]:
    """(lm-eval task config reading the converted local file, number of examples)."""
    path, n = prepare_local(name, task_data)
    task = LOCAL_TASKS[name]
    split_key = "test_split" if task.split == "test" else "validation_split"
    return {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {task.split: str(path)}},
        split_key: task.split, **task.config, "metadata": {"version": 1.0, "taille": TASK_VERSION},
    }, n
