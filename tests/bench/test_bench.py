"""`taille bench` on the embedded SmolLM2 GGUF: llama.cpp speed, memory, and the memory-budget table."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[export])")


def test_bench_reports_speed_memory_and_which_budgets_fit(capsys, smollm2):
    from taille.models.load import resolve_model

    path = resolve_model(smollm2).location
    out, _ = run_cli(capsys, "bench", path, "--prompt", 32, "--decode", 8, "--ctx", 256, "--repeats", 1,
                     "--budgets", "0.3,4", "--contexts", "256,32768", "--json")
    r = json.loads(out)
    assert r["arch"] == "llama" and r["quant"] == "q4_1" and 134e6 < r["params"] < 135e6
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["memory_rise_bytes"] > 0
    assert r["kv_bytes"] == 2 * 30 * 256 * 3 * 64 * 2  # f16 K and V: layers x context x KV heads x head size
    rows = {row["quant"]: row for row in r["fit"]}
    assert list(rows) == ["f16", "q8_0", "q4_k_m", "q4_0"] and all(row["estimated"] for row in rows.values())
    f16 = rows["f16"]["contexts"]
    assert f16["256"]["bytes"] < f16["32768"]["bytes"]  # the KV cache grows with the context
    assert f16["256"]["fits_gb"] == 0.3 and f16["32768"]["fits_gb"] == 4  # 0.3 GB holds f16 weights at 256 only
    assert rows["q4_0"]["contexts"]["256"]["bytes"] < f16["256"]["bytes"]
    out, _ = run_cli(capsys, "bench", path, "--prompt", 16, "--decode", 4, "--ctx", 128, "--repeats", 1)
    assert "decode (4 tokens)" in out and "smallest budget" in out


def test_bench_bad_input(tmp_path, capsys):
    _, err = run_cli(capsys, "bench", tmp_path / "none.gguf", code=2)
    assert "not a readable GGUF" in err or "no such GGUF" in err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    _, err = run_cli(capsys, "bench", bad, code=2)
    assert "not a readable GGUF file" in err
