"""benchmarks/recovery_general.py's bookkeeping: on a new machine (no work folder) the committed measurements
count as done, a curve's committed points are not trained again and its missing ones are, one at a time."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def recovery(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delitem(sys.modules, "recovery_general", raising=False)
    monkeypatch.delitem(sys.modules, "distill_recovery", raising=False)
    import recovery_general

    monkeypatch.setattr(recovery_general, "RESULTS", tmp_path / "results")
    return recovery_general


def point(wikitext2: float) -> dict:
    return {"ppl": {"wikitext2": wikitext2, "plays": 40.0}, "tasks": {"piqa": {"score": 55.0, "stderr": 2.0}}}


def settings(**changed) -> dict:
    return {"limit": 500, "eval_tokens": 65536, "tokens": "512K", "seq_len": 256, "batch_size": 8, "lr": 5e-4, **changed}


def test_committed_curve_points_are_not_trained_again(recovery, tmp_path, monkeypatch):
    args = SimpleNamespace(**settings())
    recovery.RESULTS.mkdir()
    committed = {"measured": {"teacher": point(25.0), "demo-mix-replies": point(98.7)},
                 "curves": {"demo-mix-replies": {"64K": point(300.0), "128K": point(200.0)}}, "settings": settings()}
    (recovery.RESULTS / "recovery_general.json").write_text(json.dumps(committed))
    work = tmp_path / "work"
    recovery.adopt_committed(work, args)

    trained, measured = [], []
    monkeypatch.setattr(recovery, "taille", lambda *a: trained.append(a[a.index("--out") - 1]))
    monkeypatch.setattr(recovery, "measure", lambda model, args, folder: measured.append(Path(model).name) or point(1.0))
    row = ("student", "roleplay:0.45,chat:0.35,shakespeare:0.2", ["--loss-on", "replies"])

    def measured_once(name, model):  # main's: the row's own measurement, kept by adopt_committed
        return json.loads((work / "measured" / f"{name}-{args.limit}.json").read_text())

    monkeypatch.setattr(recovery, "train_args", lambda args, source: ["--data", source, "--lr", "5e-4", "--tokens", "512K"])
    points = dict(recovery.curve_points(work, "demo-mix-replies", row, args, measured_once))

    assert list(points) == ["64K", "128K", "256K", "512K", "1M"]
    assert trained == ["256K", "1M"]  # the committed 64K and 128K and the row's own 512K are not trained again
    assert measured == ["demo-mix-replies-256K", "demo-mix-replies-1M"]
    assert points["64K"]["ppl"]["wikitext2"] == 300.0 and points["512K"]["ppl"]["wikitext2"] == 98.7


def test_results_of_another_protocol_are_not_adopted(recovery, tmp_path):
    recovery.RESULTS.mkdir()
    committed = {"measured": {"teacher": point(25.0)}, "curves": {"plays": {"64K": point(300.0)}},
                 "settings": settings(limit=100)}
    (recovery.RESULTS / "recovery_general.json").write_text(json.dumps(committed))
    recovery.adopt_committed(tmp_path / "work", SimpleNamespace(**settings()))
    assert not (tmp_path / "work" / "measured").exists()
