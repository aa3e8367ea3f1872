"""GGUF export through llama.cpp's converter and quantizer, checked by running the file in llama.cpp.

Tiny random-init models of every family carry SmolLM2's real tokenizer (a pruned student keeps its
teacher's), so the converter's tokenizer path is the one users hit; each is pruned first, so the shapes
are pruned shapes."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from tests.conftest import run_cli, save_tiny_with

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[export])")


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2):
    from taille.models.load import load_tokenizer

    return load_tokenizer(smollm2)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text("When shall we three meet again, in thunder, lightning, or in rain? " * 120)
    return path


def tiny_student(tmp_path, family: str, tokenizer, capsys, heldout):
    """A tiny random-init `family` model with SmolLM2's tokenizer, pruned by `taille prune`."""
    full = save_tiny_with(tmp_path / "full", family, tokenizer, tied=family == "gemma3", head_scale=40)
    pruned = tmp_path / "pruned"
    run_cli(capsys, "prune", "--model", full, "--criterion", "magnitude", "--hidden", 32, "--ffn", 64,
            "--heads", 2, "--kv-heads", 1, "--out", pruned)
    return pruned


def test_every_family_pruned_exports_and_agrees_in_llama_cpp(tmp_path, family, smollm2_tokenizer, capsys, heldout):
    import gguf

    from taille.models.arch import get_arch

    student = tiny_student(tmp_path, family, smollm2_tokenizer, capsys, heldout)
    out = tmp_path / "student-f16.gguf"
    # transformers 5 loads any tokenizer of a qwen2 model as Qwen2Tokenizer, which splits text with Qwen's
    # pattern: llama.cpp's name for it is qwen2, which the converter cannot infer for this vocabulary
    pre = ["--pre-tokenizer", "qwen2"] if family == "qwen2" else []
    stdout, _ = run_cli(capsys, "export", student, "--quant", "f16", "--out", out, "--verify", *pre,
                        "--verify-data", heldout, "--verify-blocks", 4, "--verify-len", 64, "--json")
    record = json.loads(stdout)
    v = record["verify"]
    assert v["passed"] and v["top1_agreement"] >= 0.99 and v["mean_kl"] < 1e-3, v
    assert v["tokenizer_same"] == "4/4" and v["chat_template_same"] is True
    reader = gguf.GGUFReader(str(out))
    config = AutoConfig.from_pretrained(student)
    arch = reader.fields["general.architecture"].contents()
    assert arch == get_arch(config).gguf_arch
    assert reader.fields[f"{arch}.embedding_length"].contents() == 32
    assert reader.fields[f"{arch}.feed_forward_length"].contents() == 64
    assert reader.fields[f"{arch}.attention.head_count"].contents() == 2
    assert reader.fields["tokenizer.ggml.pre"].contents() == ("qwen2" if pre else "smollm")


def test_quantized_types_shrink_the_file_and_name_the_fallbacks(tmp_path, smollm2_tokenizer, capsys, heldout):
    student = tiny_student(tmp_path, "llama", smollm2_tokenizer, capsys, heldout)
    sizes = {}
    for quant in ("f16", "q8_0", "q4_k_m", "q4_0"):
        out = tmp_path / f"{quant}.gguf"
        stdout, _ = run_cli(capsys, "export", student, "--quant", quant, "--out", out, "--verify",
                            "--verify-data", heldout, "--verify-blocks", 2, "--verify-len", 64, "--json")
        record = json.loads(stdout)
        sizes[quant] = record["bytes"]
        assert record["verify"]["top1_agreement"] > 0.5
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]
    assert sizes["q4_k_m"] < sizes["q8_0"]
    # hidden 32 and MLP 64 are not multiples of the k-quant block (256): reported, and visible in the types
    assert "hidden 32" in record["widths_kept_larger"] or quant != "q4_k_m"
    stdout, _ = run_cli(capsys, "export", student, "--quant", "q4_k_m", "--out", tmp_path / "again.gguf")
    assert "kept at a larger type: hidden 32, mlp 64" in stdout


@pytest.mark.slow  # runs llama.cpp's converter
def test_bad_export_requests(tmp_path, tiny_dir, capsys):
    _, err = run_cli(capsys, "export", tiny_dir, "--quant", "q3_z", "--out", tmp_path / "x.gguf", code=2)
    assert "unknown --quant 'q3_z'" in err and "q4_k_m" in err
    _, err = run_cli(capsys, "export", tiny_dir, "--out", tmp_path / "x.bin", code=2)
    assert "must end in .gguf" in err
    _, err = run_cli(capsys, "export", tiny_dir, "--format", "onnx", "--out", tmp_path / "x", code=2)
    assert "--format onnx" in err
    # the tiny test tokenizer is not one llama.cpp knows: the converter's refusal reaches the user
    _, err = run_cli(capsys, "export", tiny_dir, "--quant", "f16", "--out", tmp_path / "t.gguf", code=2)
    assert "llama.cpp's converter failed" in err and "pre-tokenizer" in err.lower()
    assert not (tmp_path / "t.gguf").exists()


def test_a_gemma3_attention_scale_llama_cpp_cannot_express_is_refused(tmp_path, smollm2_tokenizer, capsys, heldout):
    student = tiny_student(tmp_path, "gemma3", smollm2_tokenizer, capsys, heldout)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "query_pre_attn_scalar": 256}))
    _, err = run_cli(capsys, "export", student, "--quant", "f16", "--out", tmp_path / "g.gguf", code=2)
    assert "query_pre_attn_scalar is 256" in err and "1/sqrt(16)" in err


def test_hf_export_is_a_clean_loadable_folder(tmp_path, tiny_dir, capsys, heldout):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_cli(capsys, "prune", "--model", tiny_dir, "--criterion", "magnitude", "--hidden", 32, "--out", tmp_path / "p")
    assert (tmp_path / "p" / "taille.json").is_file()
    run_cli(capsys, "export", tmp_path / "p", "--format", "hf", "--dtype", "bf16", "--out", tmp_path / "clean")
    files = {p.name for p in (tmp_path / "clean").iterdir()}
    assert "taille.json" not in files and "model.safetensors" in files and "tokenizer.json" in files
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "clean")
    assert model.config.hidden_size == 32 and str(model.dtype) == "torch.bfloat16"
    assert AutoTokenizer.from_pretrained(tmp_path / "clean").chat_template
    _, err = run_cli(capsys, "export", tmp_path / "p", "--format", "hf", "--out", tmp_path / "clean", code=2)
    assert "not empty" in err


@pytest.mark.slow
def test_smollm2_f16_agrees_with_pytorch(tmp_path, smollm2, capsys):
    stdout, _ = run_cli(capsys, "export", smollm2, "--quant", "f16", "--out", tmp_path / "s.gguf", "--verify",
                        "--verify-blocks", 4)
    assert "PASS" in stdout and "tokenizer same on 4/4" in stdout and "chat template same" in stdout
