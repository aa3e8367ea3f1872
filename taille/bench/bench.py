"""`taille bench MODEL.gguf`: how fast llama.cpp runs the file here, and which PCs it fits.

speed   prefill: one batch of `prompt` held-out tokens; decode: `decode` tokens one at a time after it
        (greedy). Both from llama.cpp's own performance counters (`llama_perf_context`), the figures
        llama-bench prints; the median of `repeats` runs after one warm-up.
memory  the process's peak resident memory rise over loading and running the model (Linux VmHWM),
        beside the file size and the KV cache llama.cpp allocated.
fit     for each quantization and context length: weights + KV cache + compute buffers, and the
        smallest of the memory budgets (4, 6, 8, 12 GB by default) that holds it. The file's own
        quantization uses its real tensor sizes; the others are estimated from the parameter count and
        each format's bits per weight (QUANTS); the KV cache is f16, 2 x layers x context x KV heads x
        head size values; the compute buffer is the one measured here, scaled by context.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taille.errors import TailleError
from taille.models.quant import kv_cache_bytes, weight_bytes

log = logging.getLogger(__name__)

GB = 1e9


@dataclass(frozen=True)
class GgufShape:
    """What the memory estimate needs from a GGUF file's header."""

    arch: str
    layers: int
    kv_heads: int
    key_length: int
    value_length: int
    context_length: int
    params_2d: int
    """Elements of matrices (quantized in GGUF)."""
    params_1d: int
    """Elements of vectors (norms, biases: kept f32)."""
    file_quant: str
    tensor_bytes: int


FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0", 32: "bf16", 2: "q4_0", 3: "q4_1", 15: "q4_k_m", 17: "q5_k_m", 18: "q6_k"}
"""general.file_type values (llama.cpp's LLAMA_FTYPE_*) taille names: what it exports, and q4_1 (the embedded model)."""


def read_shape(path: str | Path) -> GgufShape:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises many kinds of errors on broken files
        raise TailleError(f"{path} is not a readable GGUF file: {e}") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = field("general.architecture")
    heads = field(f"{arch}.attention.head_count")
    embd = field(f"{arch}.embedding_length")
    head_size = embd // heads if heads else 0
    params = [(int(np.prod(t.shape)), len([d for d in t.shape if d > 1])) for t in reader.tensors]
    return GgufShape(
        arch=arch, layers=field(f"{arch}.block_count"),
        kv_heads=field(f"{arch}.attention.head_count_kv", heads),
        key_length=field(f"{arch}.attention.key_length", head_size),
        value_length=field(f"{arch}.attention.value_length", head_size),
        context_length=field(f"{arch}.context_length", 2048),
        params_2d=sum(n for n, dims in params if dims >= 2), params_1d=sum(n for n, dims in params if dims < 2),
        file_quant=FILE_TYPES.get(field("general.file_type", -1), "other"),
        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors),
    )


def kv_bytes(shape: GgufShape, n_ctx: int) -> int:
    return kv_cache_bytes(shape.layers, shape.kv_heads, (shape.key_length + shape.value_length) // 2, n_ctx)


def stored_bytes(shape: GgufShape, quant: str) -> int:
    """The weights at `quant`: the file's real size for its own format, else the estimate."""
    if quant == shape.file_quant:
        return shape.tensor_bytes
    return int(weight_bytes(shape.params_2d, shape.params_1d, quant))


def fit_table(shape: GgufShape, contexts: list[int], budgets_gb: list[float], compute_bytes: int,
              measured_ctx: int, quants: tuple[str, ...] = ("f16", "q8_0", "q4_k_m", "q4_0")) -> list[dict]:
    """One row per quantization: total bytes per context length and the smallest budget that holds it."""
    rows = []
    for quant in quants:
        cells = {}
        for n_ctx in contexts:
            compute = int(compute_bytes * max(1.0, n_ctx / measured_ctx) ** 0.5)  # grows slowly with context
            total = stored_bytes(shape, quant) + kv_bytes(shape, n_ctx) + compute
            fits = next((b for b in sorted(budgets_gb) if total <= b * GB), None)
            cells[n_ctx] = {"bytes": total, "fits_gb": fits}
        rows.append({"quant": quant, "estimated": quant != shape.file_quant, "contexts": cells})
    return rows


def _rss_peak() -> int:
    from taille.eval.speed import _proc_status

    return _proc_status("VmHWM:")


def bench_gguf(path: str | Path, prompt: int = 256, decode: int = 64, n_ctx: int = 2048, repeats: int = 3,
               threads: int | None = None, data: str = "shakespeare") -> dict:
    """Prefill and decode tokens/s and memory of llama.cpp running `path` (see the module docstring)."""
    from taille.eval.speed import reset_peak_memory
    from taille.models.llamacpp import default_threads, last_logits, llama_cpp, open_gguf

    if prompt + decode > n_ctx:
        raise TailleError(f"--prompt {prompt} + --decode {decode} does not fit --ctx {n_ctx}")
    lc = llama_cpp()
    shape = read_shape(path)
    import torch

    baseline = reset_peak_memory(torch.device("cpu"))
    llm = open_gguf(path, n_ctx=n_ctx, threads=threads)
    prompt_ids = _prompt_tokens(llm, data, prompt)
    prefill, decoded = [], []
    for run in range(repeats + 1):  # run 0 warms caches and is dropped
        llm.reset()
        lc.llama_perf_context_reset(llm._ctx.ctx)
        llm.eval(prompt_ids)
        for _ in range(decode):
            llm.eval([int(np.argmax(last_logits(llm)))])  # greedy
        perf = lc.llama_perf_context(llm._ctx.ctx)
        if run:
            prefill.append(perf.n_p_eval / (perf.t_p_eval_ms / 1e3))
            decoded.append(perf.n_eval / (perf.t_eval_ms / 1e3))
    peak = _rss_peak()
    kv = kv_bytes(shape, n_ctx)
    rise = peak - baseline
    compute = max(0, rise - shape.tensor_bytes - kv)
    del llm
    return {
        "gguf": str(path), "arch": shape.arch, "quant": shape.file_quant, "file_bytes": Path(path).stat().st_size,
        "params": shape.params_2d + shape.params_1d, "threads": threads or default_threads(),
        "prompt": prompt, "decode": decode, "n_ctx": n_ctx, "repeats": repeats,
        "prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decoded),
        "memory_rise_bytes": rise, "kv_bytes": kv, "compute_bytes": compute,
    }


def _prompt_tokens(llm, data: str, n: int) -> list[int]:
    """`n` tokens of held-out text, tokenized by llama.cpp itself."""
    from taille.data.sources import documents, parse_source

    text = ""
    for piece, _ in documents(parse_source(data, "heldout")):
        text += piece
        if len(text) >= n * 16:  # plenty: a token is rarely over 16 characters
            break
    ids = llm.tokenize(text[: n * 16].encode(), add_bos=False, special=False)[:n]
    if len(ids) < n:
        raise TailleError(f"{data} gave {len(ids)} tokens, fewer than --prompt {n}")
    return ids
