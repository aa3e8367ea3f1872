"""Zero-shot tasks through lm-eval on local files, checked against an independent log-likelihood."""

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from taille.eval.harness import run_tasks
from taille.eval.tasks import LOCAL_TASKS, prepare_local
from taille.models.load import load_model
from tests.conftest import run_cli, save_tiny

# ../shared/data/eval beside the checkout; CI names it in TAILLE_EVAL_DATA, and then a missing folder fails.
TASK_DATA = Path(os.environ.get("TAILLE_EVAL_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data" / "eval")
needs_data = pytest.mark.skipif(not TASK_DATA.is_dir() and not os.environ.get("TAILLE_EVAL_DATA"),
                                reason=f"no task data at {TASK_DATA} (set TAILLE_EVAL_DATA)")


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), computed directly (no lm-eval code)."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    n = len(whole) - len(context_ids)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # (T-1, V): predicts tokens 1..T-1
    targets = ids[0, 1:]
    return float(logp[-n:].gather(1, targets[-n:, None]).sum())


@needs_data
def test_arc_choices_match_an_independent_loglikelihood(tmp_path):
    model, tokenizer = load_model(str(save_tiny(tmp_path / "m", "llama")), dtype="fp32")
    record = run_tasks(model, tokenizer, ["arc_easy"], str(TASK_DATA), limit=20, batch_size=4, log_samples=True)
    samples = record["samples"]["arc_easy"]
    assert len(samples) == 20
    path, _ = prepare_local("arc_easy", TASK_DATA)
    docs = [json.loads(line) for line in path.read_text().splitlines()[:20]]
    for sample, doc in zip(sorted(samples, key=lambda s: s["doc_id"]), docs):
        context = f"Question: {doc['question']}\nAnswer:"
        ours = [loglikelihood(model, tokenizer, context, " " + choice) for choice in doc["choices"]["text"]]
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert ours == pytest.approx(theirs, abs=1e-3)
        assert max(range(len(ours)), key=ours.__getitem__) == max(range(len(theirs)), key=theirs.__getitem__)
        gold = doc["choices"]["label"].index(doc["answerKey"])
        assert sample["acc"] == float(max(range(len(ours)), key=ours.__getitem__) == gold)


@needs_data
@pytest.mark.parametrize("task", list(LOCAL_TASKS))
def test_every_local_task_converts(task):
    path, n = prepare_local(task, TASK_DATA)
    first = json.loads(path.read_text().splitlines()[0])
    assert n > 50 and first


@needs_data
def test_eval_report_with_tasks_speed_and_reference(tmp_path, capsys):
    model = save_tiny(tmp_path / "m", "qwen2")
    (tmp_path / "held.txt").write_text("when shall we three meet again in thunder lightning or in rain " * 40)
    out, _ = run_cli(capsys, "eval", model, model, "--tasks", "piqa,lambada_openai", "--task-data", TASK_DATA,
                     "--limit", 4, "--ppl", tmp_path / "held.txt", "--window", 64, "--speed", "--reference", model,
                     "--reference-data", tmp_path / "held.txt", "--out", tmp_path / "report", "--precision", "fp32")
    assert "| model | params |" in out and "piqa (acc_norm)" in out and "lambada_openai (acc)" in out
    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    row = report["rows"][0]
    assert set(row["tasks"]) == {"piqa", "lambada_openai"} and "perplexity" in row["tasks"]["lambada_openai"]
    assert row["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # a model against itself
    assert row["speed"]["b1"]["decode_tok_s"] > 0 and row["speed"]["b8"]["prefill_tok_s"] > 0
    assert report["config"]["lm_eval"] and report["n_samples"]["piqa"]["effective"] == 4
    assert report["versions"]["piqa"] is not None
    assert (tmp_path / "report" / "eval.png").stat().st_size > 1000


# --- bad input ------------------------------------------------------------------------------------


def test_unknown_task_lists_the_known_ones(tmp_path, capsys):
    _, err = run_cli(capsys, "eval", save_tiny(tmp_path / "m"), "--tasks", "arc_medium", "--task-data", tmp_path,
                     code=2)
    assert "unknown task arc_medium" in err and "arc_easy" in err and "hellaswag" in err


def test_missing_local_task_data_says_where_it_looked(tmp_path, capsys):
    _, err = run_cli(capsys, "eval", save_tiny(tmp_path / "m"), "--tasks", "piqa", "--task-data", tmp_path, code=2)
    assert "local data not found" in err and str(tmp_path / "piqa" / "valid.jsonl") in err


@needs_data
def test_limit_larger_than_the_task_uses_all_of_it(tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        out, _ = run_cli(capsys, "eval", save_tiny(tmp_path / "m"), "--tasks", "copa", "--task-data", TASK_DATA,
                         "--limit", 150, "--json", "--precision", "fp32")
    assert "using the whole task" in caplog.text
    assert json.loads(out)["n_samples"]["copa"]["effective"] == 100


def test_a_model_that_does_not_load(tmp_path, capsys):
    _, err = run_cli(capsys, "eval", tmp_path / "no-model", "--ppl", "shakespeare", code=2)
    assert "no such file or folder" in err
