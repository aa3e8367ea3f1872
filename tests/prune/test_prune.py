"""The prune verb end to end: targets, output folders that stock transformers loads, bad input."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from taille.errors import TailleError
from taille.prune.shape import Shape, count_params, search_shape
from tests.conftest import run_cli, save_tiny

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, head_dim=64)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("when shall we three meet again in thunder lightning or in rain upon the heath " * 300)
    return path


def test_smollm2_targets_from_the_config_alone():
    config = LlamaConfig(**SMOLLM2)
    assert count_params(config) == 134_515_008
    # the Minitron width recipe cannot move hidden with 9 heads (only 288 or 576 keep GGUF blocks whole)
    assert search_shape(config, 90_000_000, ("mlp", "hidden")) == Shape(576, 688, 9, 3, 30)
    # with heads free, 2 heads per KV group allow hidden in multiples of 96 (MINITRON.md: 89.98M)
    shape = search_shape(config, 90_000_000, ("mlp", "hidden", "heads"))
    assert shape == Shape(480, 1152, 6, 3, 30) and abs(count_params(config, shape) - 90e6) / 90e6 < 0.01
    with pytest.raises(TailleError, match="no shape pruning depth lands within 1%"):
        search_shape(config, 90_000_000, ("depth",))  # 17 layers = 88.5M, 18 = 92.1M


def test_prune_to_a_ratio_and_reload_in_a_fresh_process(tmp_path, corpus, capsys):
    model = save_tiny(tmp_path / "m", "qwen2")  # attention biases
    out = tmp_path / "pruned"
    run_cli(capsys, "prune", "--model", model, "--data", corpus, "--samples", 8, "--seq-len", 32,
            "--ratio", 0.7, "--axes", "mlp,heads", "--out", out, "--precision", "fp32")
    record = json.loads((out / "taille.json").read_text())
    assert abs(record["params_after"] / record["params_before"] - 0.7) < 0.01
    from taille.models.load import load_model
    pruned, _ = load_model(str(out), dtype="fp32")
    assert sum(p.numel() for p in pruned.parameters()) == record["params_after"]
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = pruned(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    code = (  # stock transformers, no taille import
        "import sys, torch; from transformers import AutoModelForCausalLM\n"
        f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)\n"
        "with torch.no_grad(): got = m(e['ids']).logits\n"
        "assert 'taille' not in sys.modules\n"
        "print(float((got - e['logits']).abs().max()))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) == 0.0


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_explicit_shape_and_drop_layers(tmp_path, corpus, capsys, family):
    model = save_tiny(tmp_path / "m", family, tied=family == "gemma3")
    run_cli(capsys, "prune", "--model", model, "--criterion", "magnitude", "--hidden", 32, "--ffn", 64,
            "--heads", 2, "--kv-heads", 1, "--out", tmp_path / "a")
    config = AutoConfig.from_pretrained(tmp_path / "a")
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim) == (32, 64, 2, 1, 16)
    run_cli(capsys, "prune", "--model", model, "--criterion", "random", "--drop-layers", "0", "--out", tmp_path / "b")
    record = json.loads((tmp_path / "b" / "taille.json").read_text())
    assert record["kept"]["layers"] == [1] and AutoConfig.from_pretrained(tmp_path / "b").num_hidden_layers == 1
    if family == "gemma3":
        assert AutoConfig.from_pretrained(tmp_path / "b").layer_types == ["sliding_attention"]


@pytest.mark.parametrize("criterion", ["block-importance", "ppl", "contiguous"])
def test_depth_criteria(tmp_path, corpus, capsys, criterion):
    model = save_tiny(tmp_path / "m", "mistral")
    run_cli(capsys, "prune", "--model", model, "--data", corpus, "--samples", 4, "--seq-len", 32, "--layers", 1,
            "--depth-criterion", criterion, "--out", tmp_path / "o")
    record = json.loads((tmp_path / "o" / "taille.json").read_text())
    assert len(record["kept"]["layers"]) == 1 and record["depth_criterion"] == criterion


def test_importance_writes_scores_and_figures(tmp_path, corpus, capsys):
    model = save_tiny(tmp_path / "m", "llama")
    out, _ = run_cli(capsys, "importance", "--model", model, "--data", corpus, "--samples", 4, "--seq-len", 32,
                     "--depth-metric", "ppl", "--block-sizes", "1,2", "--out", tmp_path / "imp")
    names = {p.name for p in (tmp_path / "imp").iterdir()}
    assert {"scores.safetensors", "importance.json", "heads.png", "neurons.png", "layers.png"} <= names
    summary = json.loads((tmp_path / "imp" / "importance.json").read_text())
    assert summary["samples"] == 4 and len(summary["layer_loss"]) == 2 and summary["block_loss"]["2"]
    # scores reused by prune
    run_cli(capsys, "prune", "--model", model, "--scores", tmp_path / "imp", "--ffn", 64, "--out", tmp_path / "p")


# --- bad input ------------------------------------------------------------------------------------

CAL = ("--data", "shakespeare")  # calibration text: the mistakes below are in the target, not in its absence


def test_target_larger_than_the_model(tmp_path, capsys):
    _, err = run_cli(capsys, "prune", "--model", save_tiny(tmp_path / "m"), "--params", "1B", *CAL, "--out", tmp_path / "o", code=2)
    assert "not smaller than the model" in err


def test_axis_reaching_zero(tmp_path, capsys):
    _, err = run_cli(capsys, "prune", "--model", save_tiny(tmp_path / "m"), "--ffn", 0, *CAL, "--out", tmp_path / "o", code=2)
    assert "--ffn 0: must be at least 1" in err  # refused with the settings, before the model loads
    _, err = run_cli(capsys, "prune", "--model", save_tiny(tmp_path / "m"), "--params", "100", *CAL, "--out", tmp_path / "o",
                     code=2)
    assert "no shape pruning mlp,hidden lands within 1%" in err


def test_shape_breaking_kv_groups_names_valid_values(tmp_path, capsys):
    _, err = run_cli(capsys, "prune", "--model", save_tiny(tmp_path / "m"), "--heads", 3, *CAL, "--out", tmp_path / "o", code=2)
    assert "breaks KV grouping" in err and "valid --heads: 2, 4" in err
    _, err = run_cli(capsys, "prune", "--model", save_tiny(tmp_path / "m"), "--hidden", 50, *CAL, "--out", tmp_path / "o", code=2)
    assert "not a multiple of 4 attention heads" in err and "nearest valid: 48, 52" in err


def test_scores_for_another_model(tmp_path, corpus, capsys):
    run_cli(capsys, "importance", "--model", save_tiny(tmp_path / "a", "llama"), "--data", corpus, "--samples", 2,
            "--seq-len", 16, "--out", tmp_path / "s", "--no-figures")
    _, err = run_cli(capsys, "prune", "--model", save_tiny(tmp_path / "b", "qwen3"), "--scores", tmp_path / "s",
                     "--ffn", 64, "--out", tmp_path / "o", code=2)
    assert "computed for another model" in err


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    _, err = run_cli(capsys, "prune", "--model", tmp_path / "gpt2", "--ffn", 8, *CAL, "--out", tmp_path / "o", code=2)
    assert "unsupported architecture gpt2" in err


def test_fewer_calibration_samples_warns_and_uses_what_there_is(tmp_path, corpus, capsys, caplog):
    model = save_tiny(tmp_path / "m")
    with caplog.at_level(logging.WARNING):
        run_cli(capsys, "importance", "--model", model, "--data", corpus, "--samples", 10_000, "--seq-len", 64,
                "--out", tmp_path / "s", "--no-figures")
    assert "calibration samples instead of 10000" in caplog.text
    summary = json.loads((tmp_path / "s" / "importance.json").read_text())
    assert 0 < summary["samples"] < 10_000
