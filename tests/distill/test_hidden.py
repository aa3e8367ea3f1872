"""Intermediate hidden-state loss: layer pairing, the projection's start, the loss, and a real run."""

import json
import shutil

import pytest
import torch

from taille.distill.hidden import cosine_loss_sum, layer_outputs, parse_pairs, projection
from taille.errors import TailleError
from tests.conftest import run_cli, save_tiny
from tests.distill.test_train import args, metrics


def test_auto_pairs_follow_the_prune_record_or_the_depth_fraction():
    # a depth-pruned student keeps teacher layers 0,1,2,5,8,9: its layer s came from kept[s]
    assert parse_pairs("auto", 6, 10, [0, 1, 2, 5, 8, 9], auto_count=3) == [(1, 1), (3, 5), (5, 9)]
    assert parse_pairs("auto", 6, 12, None, auto_count=3) == [(1, 3), (3, 7), (5, 11)]
    assert parse_pairs("auto", 2, 2, None) == [(0, 0), (1, 1)]  # never more pairs than layers


def test_explicit_pairs_and_their_errors():
    assert parse_pairs("0:1,-1:-1", 4, 8, None) == [(0, 1), (3, 7)]
    for bad, message in (("3", "STUDENT:TEACHER"), ("4:0", "does not exist in the student"),
                         ("0:8", "does not exist in the teacher"), ("1:2,1:2", "twice")):
        with pytest.raises(TailleError, match=message):
            parse_pairs(bad, 4, 8, None)


def test_projection_starts_as_the_scatter_of_kept_channels():
    proj = projection(3, 5, kept_hidden=[4, 0, 2])
    h = torch.tensor([[1.0, 2.0, 3.0]])
    assert proj(h).tolist() == [[2.0, 0.0, 3.0, 0.0, 1.0]]
    assert isinstance(projection(5, 5, None), torch.nn.Identity)
    assert projection(3, 5, None).weight.abs().sum() > 0  # default init when channels are unknown


def test_cosine_loss_is_zero_for_the_same_direction_and_counts_tokens():
    a = torch.randn(2, 3, 8)
    assert cosine_loss_sum([a, a], [2 * a, a]).abs() < 1e-5
    assert cosine_loss_sum([a], [-a]).item() == pytest.approx(2 * 6, abs=1e-4)  # 1 - (-1) per token


def test_layer_outputs_are_the_hidden_states_transformers_reports(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "m", "llama", seed=3))
    ids = torch.randint(0, 300, (2, 9))
    into = {}
    model(ids, output_hidden_states=True)  # transformers installs hooks of its own on first use
    hooks_before = len(model.model.layers[0]._forward_hooks)
    with torch.no_grad(), layer_outputs(model, [0, 1], into):
        out = model(ids, output_hidden_states=True)
    torch.testing.assert_close(into[0], out.hidden_states[1])  # hidden_states[0] is the embeddings
    assert len(model.model.layers[0]._forward_hooks) == hooks_before  # ours removed on exit


def test_distillation_with_the_hidden_loss_learns_and_resumes_exactly(tmp_path, capsys):
    teacher = save_tiny(tmp_path / "teacher", "llama", seed=1)
    run_cli(capsys, "prune", "-m", teacher, "--hidden", 48, "--criterion", "magnitude", "--out", tmp_path / "student")
    data = tmp_path / "train.txt"
    data.write_text("when shall we three meet again in thunder lightning or in rain upon the heath " * 200)
    held = tmp_path / "held.txt"
    held.write_text("the quick brown fox jumps over the lazy dog and the battle is lost and won " * 40)
    full = tmp_path / "full"
    cmd = args(teacher, tmp_path / "student", data, held, full, **{"--tokens": 2048}) + ["--hidden-layers", "auto"]
    run_cli(capsys, *cmd)
    rows = [r for r in metrics(full) if "hidden_loss" in r]
    assert len(rows) == 16 and rows[-1]["hidden_loss"] < rows[0]["hidden_loss"]
    assert all(0 < r["hidden_loss"] <= r["loss"] for r in rows)
    assert (full / "checkpoints" / "step-0000008" / "projections.safetensors").is_file()
    # resume from the step-8 checkpoint: the projections come back too, so the curve is the same
    again = tmp_path / "again"
    shutil.copytree(full / "checkpoints", again / "checkpoints")
    (again / "checkpoints" / "latest").write_text("step-0000008")
    shutil.copy(full / "metrics.jsonl", again / "metrics.jsonl")
    run_cli(capsys, *args(teacher, tmp_path / "student", data, held, again, **{"--tokens": 2048}),
            "--hidden-layers", "auto", "--resume")
    redo = [r for r in metrics(again) if "hidden_loss" in r]
    assert [r["step"] for r in redo] == list(range(1, 17))
    assert redo[-1]["loss"] == pytest.approx(rows[-1]["loss"], abs=1e-5)
    assert redo[-1]["hidden_loss"] == pytest.approx(rows[-1]["hidden_loss"], abs=1e-5)
    record = json.loads((again / "taille.json").read_text())["distill"]
    assert record["config"]["hidden_layers"] == "auto"


def test_hidden_loss_needs_a_live_teacher(tmp_path, capsys):
    student = save_tiny(tmp_path / "s", "llama")
    _, err = run_cli(capsys, "distill", "--student", student, "--data", "shakespeare", "--ce-weight", 1,
                     "--hidden-layers", "auto", "--out", tmp_path / "o", code=2)
    assert "--hidden-layers compares" in err
