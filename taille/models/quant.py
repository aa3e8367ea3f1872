"""GGUF storage formats as data: block size, bits per weight, the llama.cpp constant that makes each,
and the memory a model takes in them (weights and KV cache). Used by `info`, `plan`, `export` and
`bench`, so every size estimate in taille comes from this one table."""

from __future__ import annotations

from dataclasses import dataclass

from taille.errors import TailleError


@dataclass(frozen=True)
class Quant:
    """One GGUF output type."""

    ftype: str
    """llama.cpp's file-type constant (llama_cpp.LLAMA_FTYPE_*)."""
    convert_type: str | None
    """`--outtype` of the converter when it writes this type itself; None when llama.cpp's quantizer
    makes it from an f16 file."""
    block: int
    """Weights per quantization block: rows must be multiples of it to use this type."""
    bits: float
    """Bits per weight of a quantized 2-D tensor (k-quant mixes: an average; the mix depends on the model)."""
    min_agreement: float | None = None
    """Least top-1 next-token agreement with the PyTorch model that `--verify` accepts (None: report only)."""


QUANTS: dict[str, Quant] = {
    "f32": Quant("LLAMA_FTYPE_ALL_F32", "f32", 1, 32.0, 0.99),
    "f16": Quant("LLAMA_FTYPE_MOSTLY_F16", "f16", 1, 16.0, 0.99),
    "bf16": Quant("LLAMA_FTYPE_MOSTLY_BF16", "bf16", 1, 16.0, 0.97),
    "q8_0": Quant("LLAMA_FTYPE_MOSTLY_Q8_0", None, 32, 8.5, 0.97),
    "q6_k": Quant("LLAMA_FTYPE_MOSTLY_Q6_K", None, 256, 6.5625),
    "q5_k_m": Quant("LLAMA_FTYPE_MOSTLY_Q5_K_M", None, 256, 5.69),
    "q4_k_m": Quant("LLAMA_FTYPE_MOSTLY_Q4_K_M", None, 256, 4.85),
    "q4_0": Quant("LLAMA_FTYPE_MOSTLY_Q4_0", None, 32, 4.5),
}


def get_quant(name: str) -> Quant:
    key = name.lower()
    if key not in QUANTS:
        raise TailleError(f"unknown --quant '{name}'; choose one of {', '.join(QUANTS)}")
    return QUANTS[key]


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, context: int) -> int:
    """f16 K and V of one sequence of `context` tokens: 2 x layers x context x KV heads x head size x 2 bytes."""
    return 2 * layers * kv_heads * head_dim * context * 2


def weight_bytes(matrix_params: int, vector_params: int, quant: str) -> float:
    """Weights stored at `quant`: matrices at its bits per weight, vectors (norms, biases) in f32."""
    return matrix_params * get_quant(quant).bits / 8 + vector_params * 4
