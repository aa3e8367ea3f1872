"""`--verify` passes a GGUF file when its perplexity ratio and mean KL against PyTorch are within what a correct
export of its type reaches (taille/models/quant.py holds the measurements); top-1 agreement is only reported.

The slow tests export the embedded teacher (SmolLM2-135M-Instruct) at f16, q8_0 and q4_k_m and check that
each passes, then zero one weight tensor of an exported file and check that verification fails it. They use 4
verify blocks of 128 tokens; the gates' table has the 4-block measurements beside the 8-block defaults."""

from __future__ import annotations

import math
import shutil

import pytest

from taille.export.verify import gate
from taille.models.quant import QUANTS

BLOCKS = 4


def result(quant: str | None, ppl_ratio: float, mean_kl: float, top1: float = 0.5, **extra) -> dict:
    q = QUANTS.get(quant)
    return {
        "quant": quant, "ppl_pytorch": 50.0, "ppl_gguf": 50.0 * ppl_ratio, "ppl_ratio": ppl_ratio,
        "mean_kl": mean_kl, "top1_agreement": top1,
        "gates": {"max_ppl_ratio": q.max_ppl_ratio if q else None, "max_mean_kl": q.max_mean_kl if q else None},
        "tokenizer_same_count": 4, "tokenizer_texts": 4, "chat_template_same": True, **extra,
    }


def test_every_main_type_has_gates_ordered_by_precision():
    for name in ("f32", "f16", "bf16", "q8_0", "q6_k", "q4_k_m", "q4_0"):
        assert QUANTS[name].max_ppl_ratio and QUANTS[name].max_mean_kl, name
    kl = {name: QUANTS[name].max_mean_kl for name in ("f16", "q8_0", "q6_k", "q4_k_m", "q4_0")}
    assert list(kl.values()) == sorted(kl.values()), kl


def test_gates_decide_and_top1_is_only_reported():
    # the q8_0 export of SmolLM2 that the old top-1 gate (97%) failed: 94.2% top-1, ratio 0.994, KL 0.0089
    v = gate(result("q8_0", 0.9944, 0.0089, top1=0.942))
    assert v["passed"] and v["checks"]["ppl_ratio"] and v["checks"]["mean_kl"] and v["failed"] == []
    assert v["checks"]["top1_agreement"] is None
    v = gate(result("q8_0", 1.15, 0.216, top1=0.70))  # one zeroed tensor
    assert not v["passed"] and v["checks"]["ppl_ratio"] is False and v["checks"]["mean_kl"] is False
    assert any("mean KL 0.21600 above 0.025" in f for f in v["failed"]), v["failed"]
    assert any("perplexity ratio 1.1500 above 1.05" in f for f in v["failed"]), v["failed"]
    # the same numbers are fine for q4_0, whose own quantization costs more
    assert gate(result("q4_0", 1.15, 0.216))["passed"]


def test_unknown_types_are_reported_only_but_nan_always_fails():
    v = gate(result(None, 3.0, 2.0))
    assert v["passed"] and v["checks"]["ppl_ratio"] is None and v["checks"]["mean_kl"] is None
    for quant in (None, "q4_0"):
        v = gate(result(quant, math.nan, math.nan, ppl_gguf=math.nan))
        assert not v["passed"] and "NaN" in v["failed"][0], v
    v = gate(result("f16", 1.0, 0.0, tokenizer_same_count=3, chat_template_same=False))
    assert not v["passed"] and len(v["failed"]) == 2, v["failed"]


@pytest.fixture(scope="module")
def teacher_f16(smollm2, tmp_path_factory):
    from taille.export.gguf import export_gguf

    path = tmp_path_factory.mktemp("teacher") / "teacher-f16.gguf"
    export_gguf(smollm2, path, "f16")
    return path


def teacher_at(teacher_f16, quant: str):
    """The teacher's export at `quant`: export_gguf converts to f16 and quantizes that, so the quantized types
    are made here from the one f16 export (the same file export_gguf would write, without converting again)."""
    from taille.export.gguf import quantize
    from taille.models.quant import get_quant

    if quant == "f16":
        return teacher_f16
    out = teacher_f16.with_name(f"teacher-{quant}.gguf")
    if not out.is_file():
        quantize(teacher_f16, out, get_quant(quant))
    return out


@pytest.mark.slow  # the real SmolLM2 in PyTorch and llama.cpp
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_correct_smollm2_exports_pass_verify(teacher_f16, smollm2, quant):
    from taille.export.verify import verify_gguf

    v = verify_gguf(teacher_at(teacher_f16, quant), smollm2, blocks=BLOCKS)
    assert v["quant"] == quant  # read from the file's general.file_type
    assert v["checks"]["ppl_ratio"] is True and v["checks"]["mean_kl"] is True, v
    assert v["passed"], v["failed"]
    assert v["tokenizer_same"] == f"{BLOCKS}/{BLOCKS}" and v["chat_template_same"] is True


@pytest.mark.slow  # the real SmolLM2 in PyTorch and llama.cpp
def test_a_smollm2_export_with_one_zeroed_tensor_fails_verify(teacher_f16, smollm2, tmp_path):
    """q4_k_m has the loosest gates of the tested types, so it is the hardest place to see damage."""
    import gguf

    from taille.export.verify import verify_gguf

    damaged = tmp_path / "damaged-q4_k_m.gguf"
    shutil.copy(teacher_at(teacher_f16, "q4_k_m"), damaged)
    reader = gguf.GGUFReader(damaged, "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.15.ffn_down.weight")
    tensor.data[...] = 0  # quantized blocks with zero scales: one layer's MLP output is gone
    reader.data.flush()
    del reader, tensor

    v = verify_gguf(damaged, smollm2, blocks=BLOCKS)
    assert v["quant"] == "q4_k_m"
    assert not v["passed"], v
    assert v["checks"]["mean_kl"] is False and v["checks"]["ppl_ratio"] is False, v
    assert v["tokenizer_same"] == f"{BLOCKS}/{BLOCKS}"  # only the weights are wrong
