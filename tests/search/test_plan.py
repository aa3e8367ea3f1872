"""The planner on the published Minitron shapes (configs written from ../shared/MINITRON.md)."""

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
