"""Every documented mode of `distill` runs as documented, or is refused before any work: CE-only training
without a teacher, a teacher cache at a temperature, the gradient norm clipping computes, and a fresh run's
messages."""

import json
import logging

import pytest

from tests.conftest import run_cli
from tests.distill.test_train import args, make_setup, metrics


@pytest.fixture
def setup(tmp_path):
    return make_setup(tmp_path, tied=False)


def without(argv, flag):
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def test_ce_only_training_without_a_teacher_runs_and_learns(setup, tmp_path, capsys):
    teacher, student, data, held = setup
    argv = without(args(teacher, student, data, held, tmp_path / "ce"), "--teacher")
    out, _ = run_cli(capsys, *argv, "--ce-weight", 1)
    train = [r["loss"] for r in metrics(tmp_path / "ce") if "loss" in r]
    assert train[-1] < 0.6 * train[0]  # next-token cross-entropy on the data falls
    assert "eval_kl" not in "".join((tmp_path / "ce" / "metrics.jsonl").read_text())  # no teacher, no KL
    record = json.loads((tmp_path / "ce" / "taille.json").read_text())["distill"]["config"]
    assert record["loss"]["kd_weight"] == 0.0 and record["teacher"] is None


def test_a_kd_weight_without_a_teacher_is_refused(setup, tmp_path, capsys):
    teacher, student, data, held = setup
    argv = without(args(teacher, student, data, held, tmp_path / "x"), "--teacher")
    _, err = run_cli(capsys, *argv, "--ce-weight", 1, "--kd-weight", 0.5, code=2)
    assert "--kd-weight 0.5 needs a --teacher" in err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def cache_argv(setup, tmp_path, cache, out, temperature):
    teacher, student, data, held = setup
    argv = args(teacher, student, data, held, out, **{"--tokens": 512, "--eval-every": 100})
    i = argv.index("--teacher")
    argv[i:i + 2] = ["--teacher-cache", str(cache)]
    return without(argv, "--data") + ["--temperature", str(temperature)]


def test_a_cache_refuses_another_temperature_and_honours_its_own(setup, tmp_path, capsys):
    teacher, student, data, held = setup
    for t in (1, 2):  # K = V: the cache holds the teacher's whole distribution at temperature t
        run_cli(capsys, "teacher-cache", "--teacher", teacher, "--data", data, "--out", tmp_path / f"c{t}",
                "--top-k", 320, "--seq-len", 32, "--precision", "fp32", "--temperature", t)
        assert json.loads((tmp_path / f"c{t}" / "meta.json").read_text())["temperature"] == t
    _, err = run_cli(capsys, *cache_argv(setup, tmp_path, tmp_path / "c1", tmp_path / "bad", 2), code=2)
    assert "holds log-probabilities at temperature 1" in err and "--temperature 2" in err
    assert not (tmp_path / "bad").exists()

    run_cli(capsys, *cache_argv(setup, tmp_path, tmp_path / "c2", tmp_path / "cached", 2))
    live = args(teacher, student, data, held, tmp_path / "live", **{"--tokens": 512, "--eval-every": 100})
    run_cli(capsys, *live, "--temperature", 2)
    cached_loss = [r["loss"] for r in metrics(tmp_path / "cached") if "loss" in r]
    live_loss = [r["loss"] for r in metrics(tmp_path / "live") if "loss" in r]
    assert cached_loss == pytest.approx(live_loss, rel=3e-3)  # fp16 log-probabilities in the cache


def test_the_gradient_norm_is_logged_before_clipping(setup, tmp_path, capsys):
    run_cli(capsys, *args(*setup, tmp_path / "a", **{"--tokens": 512, "--clip": 1e-3}))
    run_cli(capsys, *args(*setup, tmp_path / "b", **{"--tokens": 512, "--clip": 0}))
    clipped = [r["grad_norm"] for r in metrics(tmp_path / "a") if "loss" in r]
    free = [r["grad_norm"] for r in metrics(tmp_path / "b") if "loss" in r]
    # the first step sees the same weights and batch: the norm is measured before the clip scales it
    assert clipped[0] == pytest.approx(free[0], rel=1e-5) and clipped[0] > 1e-3
    assert clipped[1:] != pytest.approx(free[1:], rel=1e-3)  # the clip changed the training after that


def test_a_fresh_run_does_not_warn_about_resuming(setup, tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO):
        run_cli(capsys, *args(*setup, tmp_path / "fresh", **{"--tokens": 256}), "--resume")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "resume" in r.getMessage()]
    assert any("starting from step 0" in r.getMessage() for r in caplog.records)
