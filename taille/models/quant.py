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
    max_ppl_ratio: float | None = None
    """Largest perplexity ratio (llama.cpp / PyTorch, same held-out tokens) that `--verify` accepts
    (None: report only). Measured values and margins: the table above QUANTS."""
    max_mean_kl: float | None = None
    """Largest mean KL(PyTorch || llama.cpp) per position, in nats, that `--verify` accepts (None: report only)."""


# `--verify` gates: what correct exports of the embedded teacher SmolLM2-135M-Instruct reach, measured with
# taille.export.verify.verify_gguf on the shakespeare held-out text at --verify-len 128, with the CLI's default
# 8 blocks (1016 positions) and with 4 blocks (508 positions, what the slow tests use). llama-cpp-python
# 0.3.36, x86 CPU without AMX, fp32 PyTorch. "ratio" is ppl GGUF / ppl PyTorch; KL is mean KL(PyTorch || GGUF)
# per position in nats; top-1 is reported, not gated.
#
#   type    blocks  ppl PyTorch  ppl GGUF  ratio   mean KL   top-1   | gate: ratio <=  KL <=
#   f32       8       77.12       77.13    1.0000  1.3e-06  100.0%   |       1.01      0.001
#             4       56.55       56.54    0.9998  1.7e-06  100.0%   |
#   f16       8       77.12       77.12    0.9999  8.4e-06   99.7%   |       1.01      0.001
#             4       56.55       56.53    0.9998  1.0e-05   99.4%   |
#   bf16      8       77.12       77.36    1.0030  0.00039   99.0%   |       1.02      0.002
#             4       56.55       56.86    1.0055  0.00057   98.2%   |
#   q8_0      8       77.12       76.69    0.9944  0.0089    94.2%   |       1.05      0.025
#             4       56.55       56.10    0.9921  0.0113    93.3%   |
#   q6_k      8       77.12       78.95    1.0237  0.0221    90.2%   |       1.05      0.06
#             4       56.55       57.70    1.0204  0.0263    88.2%   |
#   q5_k_m    8       77.12       91.35    1.1844  0.129     77.0%   |       1.4       0.3
#             4       56.55       66.24    1.1715  0.145     75.8%   |
#   q4_k_m    8       77.12       82.30    1.0671  0.0966    82.4%   |       1.2       0.25
#             4       56.55       61.72    1.0915  0.121     79.7%   |
#   q4_0      8       77.12       94.42    1.2243  0.473     60.3%   |       1.5       1.1
#             4       56.55       68.10    1.2044  0.529     59.4%   |
#
# A second reference, to see the gates hold beyond SmolLM2: the tiny pruned random-init llama of
# tests/export/test_export.py (hidden 32, 2 layers, logits scaled x40, ppl 2.4e8), 2 blocks of 64 tokens:
#
#   type     ratio   mean KL   top-1        type     ratio   mean KL   top-1
#   f32     1.0000  4.4e-08  100.0%        q6_k    1.0233  0.00094   97.6%   (all q8_0: rows of 32/64)
#   f16     1.0001  1.5e-06  100.0%        q5_k_m  1.0592  0.0150    91.3%
#   bf16    0.9938  9.2e-05   99.2%        q4_k_m  1.0732  0.0205    90.5%
#   q8_0    1.0233  0.00094   97.6%        q4_0    0.8817  0.0748    79.4%
#
# Its KLs are all below SmolLM2's, but with such a peaked, wrong model the perplexity moves more: its q8_0
# ratio (1.023) is what sets q8_0's ratio gate.
#
# Margin: each gate is about twice the worst measurement above, rounded up: KL <= ~2x the measured KL, ratio
# <= 1 + ~2x the measured |ratio - 1|. Twice, because the 4-block and 8-block numbers already differ by up to
# 35% (KL) and other models (pruned, distilled, other families) quantize somewhat differently; much more would
# let real damage through. The near-lossless types (f32, f16) get a floor instead, KL 0.001 and ratio 1.01:
# still 9x below q8_0's KL, while their 2x (2e-5) would fail models with larger activations for no defect.
#
# What the gates catch (4 blocks): zeroing one tensor (blk.15.ffn_down) gives KL 0.22 / ratio 1.15 in an f16
# or q8_0 file and KL 0.35 / ratio 1.32 in a q4_k_m file; reversing one layer's K rows within each head (a
# missed RoPE permutation) gives KL 0.23 in f16; scaling blk.15.ffn_down by 1.5 gives KL 0.046. Every one of
# those fails its type's gate; a NaN anywhere fails whatever the type.
#
# Caveats of the reference: the teacher's weights are dequantized Q4_1 (as shipped), and its 576-wide rows are
# not multiples of the k-quant block (256), so llama.cpp stores most of q4_k_m as q5_0 and most of q5_k_m as
# q5_1, which it quantizes worse here (hence q5_k_m's looser gate than q4_k_m's).
QUANTS: dict[str, Quant] = {
    "f32": Quant("LLAMA_FTYPE_ALL_F32", "f32", 1, 32.0, max_ppl_ratio=1.01, max_mean_kl=0.001),
    "f16": Quant("LLAMA_FTYPE_MOSTLY_F16", "f16", 1, 16.0, max_ppl_ratio=1.01, max_mean_kl=0.001),
    "bf16": Quant("LLAMA_FTYPE_MOSTLY_BF16", "bf16", 1, 16.0, max_ppl_ratio=1.02, max_mean_kl=0.002),
    "q8_0": Quant("LLAMA_FTYPE_MOSTLY_Q8_0", None, 32, 8.5, max_ppl_ratio=1.05, max_mean_kl=0.025),
    "q6_k": Quant("LLAMA_FTYPE_MOSTLY_Q6_K", None, 256, 6.5625, max_ppl_ratio=1.05, max_mean_kl=0.06),
    "q5_k_m": Quant("LLAMA_FTYPE_MOSTLY_Q5_K_M", None, 256, 5.69, max_ppl_ratio=1.4, max_mean_kl=0.3),
    "q4_k_m": Quant("LLAMA_FTYPE_MOSTLY_Q4_K_M", None, 256, 4.85, max_ppl_ratio=1.2, max_mean_kl=0.25),
    "q4_0": Quant("LLAMA_FTYPE_MOSTLY_Q4_0", None, 32, 4.5, max_ppl_ratio=1.5, max_mean_kl=1.1),
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
