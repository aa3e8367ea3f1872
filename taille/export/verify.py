"""`taille export --verify`: does the GGUF file still behave like the PyTorch model?

The same held-out token blocks go through both: the PyTorch model (fp32) and llama.cpp running the file.
At every position we compare the next-token distributions:
  top-1 agreement  share of positions whose most likely next token is the same
  mean KL          KL(PyTorch || llama.cpp) per position, in nats
  perplexity       of the held-out tokens under each
Both read the same token ids, so these measure the weights and the runtime. The tokenizer and chat
template written into the file are checked apart: the held-out texts must tokenize to the same ids in
llama.cpp as in transformers, and a sample conversation must render to the same prompt.

Pass/fail: each GGUF type has gates on the perplexity ratio (llama.cpp / PyTorch) and the mean KL, set from
what correct exports reach (taille.models.quant, with the measurements). Top-1 agreement is reported
beside them but not gated: quantization noise flips near-ties, so a correct q8_0 export of SmolLM2 agrees
on only ~94% of positions while its perplexity is within 1%. Types without gates are reported only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from taille.errors import TailleError

log = logging.getLogger(__name__)

SAMPLE_CHAT = [
    {"role": "system", "content": "You are a blacksmith in a mountain village."},
    {"role": "user", "content": "Can you mend my sword before nightfall?"},
    {"role": "assistant", "content": "Aye, if you bring me coal."},
    {"role": "user", "content": "Where do I find coal?"},
]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()


def compare_logits(reference: np.ndarray, candidate: np.ndarray, targets: np.ndarray) -> dict:
    """reference, candidate: (N, V) logits at the same N positions; targets: (N,) the tokens that came
    next. Sums (not means) so blocks can be added up."""
    ref_lp, cand_lp = _log_softmax(reference), _log_softmax(candidate)  # (N, V) each
    kl = (np.exp(ref_lp) * (ref_lp - cand_lp)).sum(-1)  # (N,)
    rows = np.arange(len(targets))
    return {
        "positions": len(targets),
        "top1_same": int((reference.argmax(-1) == candidate.argmax(-1)).sum()),
        "kl_sum": float(kl.sum()),
        "nll_reference": float(-ref_lp[rows, targets].sum()),
        "nll_candidate": float(-cand_lp[rows, targets].sum()),
    }


def file_quant(llm) -> str | None:
    """The taille type name of a loaded GGUF, from its general.file_type (None if unknown)."""
    from taille.models.llamacpp import llama_cpp
    from taille.models.quant import QUANTS

    try:
        file_type = int(llm.metadata["general.file_type"])
    except (KeyError, TypeError, ValueError):
        return None
    lc = llama_cpp()
    return next((name for name, q in QUANTS.items() if getattr(lc, q.ftype, None) == file_type), None)


def gate(result: dict, min_agreement: float | None = None) -> dict:
    """Add the verdicts to a verify result: `checks` (each True, False, or None when not gated), `failed`
    (one sentence per failed check) and `passed`. The limits are in result["gates"] (None: report only).
    NaN or infinite results fail whatever the type."""
    gates = result["gates"]
    finite = all(np.isfinite(result[k]) for k in ("ppl_pytorch", "ppl_gguf", "mean_kl"))
    checks = {
        "finite": finite,
        "ppl_ratio": None if gates["max_ppl_ratio"] is None else result["ppl_ratio"] <= gates["max_ppl_ratio"],
        "mean_kl": None if gates["max_mean_kl"] is None else result["mean_kl"] <= gates["max_mean_kl"],
        "top1_agreement": None if min_agreement is None else result["top1_agreement"] >= min_agreement,
        "tokenizer": result["tokenizer_same_count"] == result["tokenizer_texts"],
        "chat_template": result["chat_template_same"],
    }
    failed = []
    if not finite:
        failed.append(f"non-finite results (perplexity {result['ppl_gguf']}, mean KL {result['mean_kl']}): "
                      "the file computes NaN or infinity")
    else:
        if checks["ppl_ratio"] is False:
            failed.append(f"perplexity ratio {result['ppl_ratio']:.4f} above {gates['max_ppl_ratio']}, the limit "
                          f"for {result['quant']}")
        if checks["mean_kl"] is False:
            failed.append(f"mean KL {result['mean_kl']:.5f} above {gates['max_mean_kl']}, the limit for {result['quant']}")
    if checks["top1_agreement"] is False:
        failed.append(f"top-1 agreement {result['top1_agreement']:.2%} below {min_agreement:.0%}")
    if checks["tokenizer"] is False:
        failed.append(f"tokenizer differs on {result['tokenizer_texts'] - result['tokenizer_same_count']} "
                      f"of {result['tokenizer_texts']} texts")
    if checks["chat_template"] is False:
        failed.append("chat template renders differently (or is missing from the file)")
    return {**result, "checks": checks, "failed": failed, "passed": not failed}


@torch.no_grad()
def verify_gguf(gguf_path: str | Path, model: str, data: str = "shakespeare", blocks: int = 8,
                seq_len: int = 128, threads: int | None = None, min_agreement: float | None = None,
                quant: str | None = None) -> dict:
    """Compare the GGUF file with the PyTorch `model` it was exported from (see the module docstring).

    `quant` names the file's type for its gates (default: read from the file's general.file_type).
    `min_agreement` is an optional extra top-1 gate; no type sets one."""
    from taille.data.tokens import load_tokens
    from taille.models.llamacpp import open_gguf
    from taille.models.load import load_model
    from taille.models.quant import get_quant

    lm, tokenizer = load_model(model, dtype="fp32", device="cpu")
    stream = load_tokens(data, tokenizer, split="heldout", max_tokens=blocks * seq_len, progress=False)
    usable = len(stream) // seq_len * seq_len
    if usable == 0:
        raise TailleError(f"--verify-data {data}: {len(stream)} held-out tokens, fewer than one block of {seq_len}")
    token_blocks = np.asarray(stream.tokens[:usable], dtype=np.int64).reshape(-1, seq_len)  # (nb, L)
    llm = open_gguf(gguf_path, n_ctx=seq_len, logits_all=True, threads=threads)
    if llm.n_vocab() < lm.config.vocab_size:
        raise TailleError(f"{gguf_path} has {llm.n_vocab()} tokens, the model {lm.config.vocab_size}: not its export")
    quant = quant.lower() if quant else file_quant(llm)
    q = get_quant(quant) if quant else None

    total = {"positions": 0, "top1_same": 0, "kl_sum": 0.0, "nll_reference": 0.0, "nll_candidate": 0.0}
    for block in token_blocks:
        ids = torch.from_numpy(block)[None]  # (1, L)
        reference = lm(ids).logits[0, :-1].float().numpy()  # (L-1, V) predictions for positions 1..L-1
        llm.reset()
        llm.eval(block.tolist())
        candidate = np.asarray(llm.scores[: seq_len - 1, : reference.shape[-1]], dtype=np.float32)  # (L-1, V)
        for key, value in compare_logits(reference, candidate, block[1:]).items():
            total[key] += value

    texts = [tokenizer.decode(b, skip_special_tokens=True) for b in token_blocks]
    same_ids = sum(
        tokenizer.encode(t, add_special_tokens=False) == llm.tokenize(t.encode(), add_bos=False, special=False)
        for t in texts
    )
    template = llm.metadata.get("tokenizer.chat_template")
    if template and tokenizer.chat_template:
        expected = tokenizer.apply_chat_template(SAMPLE_CHAT, tokenize=False, add_generation_prompt=True)
        written = tokenizer.apply_chat_template(SAMPLE_CHAT, chat_template=template, tokenize=False,
                                                add_generation_prompt=True)
        template_same = written == expected
    else:
        template_same = None if not (template or tokenizer.chat_template) else False

    n = total["positions"]
    ppl_pytorch = float(np.exp(total["nll_reference"] / n))
    ppl_gguf = float(np.exp(total["nll_candidate"] / n))
    result = {
        "gguf": str(gguf_path), "model": model, "quant": quant, "data": stream.meta["source"], "positions": n,
        "top1_agreement": total["top1_same"] / n, "mean_kl": total["kl_sum"] / n,
        "ppl_pytorch": ppl_pytorch, "ppl_gguf": ppl_gguf, "ppl_ratio": ppl_gguf / ppl_pytorch,
        "gates": {"max_ppl_ratio": q.max_ppl_ratio if q else None, "max_mean_kl": q.max_mean_kl if q else None},
        "min_agreement": min_agreement,
        "tokenizer_same": f"{same_ids}/{len(texts)}", "tokenizer_same_count": same_ids, "tokenizer_texts": len(texts),
        "chat_template_same": template_same,
    }
    del llm
    return gate(result, min_agreement)
