"""The planner on the published Minitron shapes (configs written from ../shared/MINITRON.md)."""

import json

import pytest

from transformers import LlamaConfig, MistralConfig

from taille.prune.shape import Shape, count_params
from taille.search.plan import plan

NEMO_12B = MistralConfig(hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=131072, tie_word_embeddings=False)
LLAMA_31_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)


def test_mn_minitron_8b_is_a_candidate():
    published = Shape(4096, 11520, 32, 8, 40)
    assert abs(count_params(NEMO_12B, published) - 8.4e9) / 8.4e9 < 0.01
    shapes = [c.shape for c in plan(NEMO_12B, params=8_400_000_000)]
    assert published in shapes


def test_llama_31_minitron_4b_width_and_depth_are_candidates():
    width, depth = Shape(3072, 9216, 32, 8, 32), Shape(4096, 14336, 32, 8, 16)
    for s in (width, depth):
        assert abs(count_params(LLAMA_31_8B, s) - 4.5e9) / 4.5e9 < 0.01
    candidates = plan(LLAMA_31_8B, params=4_500_000_000)
    shapes = [c.shape for c in candidates]
    assert width in shapes and depth in shapes
    assert all(abs(c.params - 4.5e9) <= 0.05 * 4.5e9 for c in candidates)


def test_memory_budget_counts_the_kv_cache():
    candidates = plan(LLAMA_31_8B, memory_gib=4.0, quant="q4_k_m", context=4096)
    for c in candidates[:50]:
        assert 0.9 * 4.0 <= c.weights_gib["q4_k_m"] + c.kv_cache_gib <= 4.0
    assert candidates[0].kv_cache_gib > 0


def test_smollm2_plan_holds_the_minitron_md_shape():
    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, head_dim=64)
    shapes = [c.shape for c in plan(smol, params=90_000_000)]
    assert Shape(480, 1152, 6, 3, 30) in shapes  # 6 heads allow hidden in multiples of 96
    assert all(s.hidden % s.heads == 0 and s.hidden % 32 == 0 for s in shapes)


def test_plan_cli(capsys):
    from tests.conftest import run_cli
    import json
    from pathlib import Path
    # a config folder is enough: no weights are read
    folder = Path(__import__("tempfile").mkdtemp()) / "llama-8b"
    LLAMA_31_8B.save_pretrained(folder)
    out, _ = run_cli(capsys, "plan", folder, "--params", "4.5B", "--json")
    assert {"layers": 16, "hidden": 4096, "ffn": 14336, "heads": 32, "kv_heads": 8} in [c["shape"] for c in json.loads(out)]
    out, _ = run_cli(capsys, "plan", folder, "--memory", "6GB", "--quant", "q4_k_m", "--context", "8192", "--top", "5")
    assert "candidate shapes" in out and "KV@8192 GiB" in out


def test_width_shapes_come_first_and_the_published_nemo_8b_is_near_the_top():
    candidates = plan(NEMO_12B, params=8_400_000_000)
    width = [c for c in candidates if c.shape.layers == 40]
    assert width and candidates[:len(width)] == width  # Minitron's width recipe before any depth cut
    layers = [c.shape.layers for c in candidates]
    assert layers == sorted(layers, reverse=True)  # then the fewest layers dropped first
    published = [c.shape for c in candidates].index(Shape(4096, 11520, 32, 8, 40))
    assert published < 20  # within the rows `taille plan` prints by default


def test_memory_sizes_in_the_forms_users_write(tmp_path, capsys):
    from tests.conftest import run_cli

    LLAMA_31_8B.save_pretrained(tmp_path / "llama")
    counts = {}
    for memory in ("4G", "4GB", "4GiB", "4 GB", "4096M", "4.0GiB"):
        out, _ = run_cli(capsys, "plan", tmp_path / "llama", "--memory", memory, "--json")
        counts[memory] = len(json.loads(out))
    assert len(set(counts.values())) == 1 and counts["4G"] > 0  # all mean 4 x 2^30 bytes
    out, _ = run_cli(capsys, "plan", tmp_path / "llama", "--memory", "4.5 GB", "--json")
    rows = json.loads(out)
    assert rows and all(4.05 <= c["weights_gib"]["q4_k_m"] + c["kv_cache_gib"] <= 4.5 for c in rows)


@pytest.mark.parametrize("text,value", [("6G", 6 << 30), ("6GB", 6 << 30), ("6GiB", 6 << 30), ("6.5 GB", int(6.5 * 2**30)),
                                        ("512M", 512 << 20), ("512mib", 512 << 20), ("1048576", 1 << 20), ("2T", 2 << 40)])
def test_parse_bytes(text, value):
    from taille.options import parse_bytes

    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["6Q", "GB", "", "6 G B", "-1G"])
def test_parse_bytes_refuses(text):
    from taille.errors import TailleError
    from taille.options import parse_bytes

    with pytest.raises(TailleError, match="--memory"):
        parse_bytes(text)


def test_a_budget_the_whole_model_fits_says_so(capsys, smollm2):
    from tests.conftest import run_cli

    out, _ = run_cli(capsys, "plan", smollm2, "--memory", "6G")
    assert "fits 6 GiB unpruned" in out and "nothing to cut" in out
