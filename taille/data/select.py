"""Difference sampling (MiniPLM, Gu et al., ICLR 2025): from a pool of training blocks, keep those where the
teacher is furthest ahead of a small reference model, the text a student has the most to learn from.

Each block of the pool (the first `pool` x `tokens` tokens of `data`, cut into `seq_len` blocks in the order
distillation reads them) is scored by the mean over its predicted tokens of
    log p_teacher(token | prefix) - log p_reference(token | prefix);
the highest-scoring blocks, `tokens` of them in all, are written as JSONL text (`--data` reads it, alone or
in a mixture) in their pool order, with their score. Easy text that both models predict scores near 0, and
so does noise that neither predicts; what the teacher knows and the small model does not scores high. With
the pruned student itself as the reference (the issue's setting), that is the text pruning damaged most.
Distillation tokenizes the text again, one record a document (EOS between records), so its blocks hold the
same text but are not cut where the scored blocks were; a tokenizer that merges across a cut (SmolLM2 joins
two newlines) gives a token fewer here and there. A mixture's small sources repeat in its pool: a block
drawn twice is kept once. `OUT.meta.json` records the settings and the score distribution of kept and
dropped blocks.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from taille.errors import TailleError
from taille.models.precision import check_precision
from taille.options import Count, coerce

log = logging.getLogger(__name__)


@dataclass
class SelectSettings:
    out: str
    """JSONL file to write the kept blocks to (one {"text", "score", "block"} record each)."""
    teacher: str
    """The teacher model."""
    reference: str
    """The small model the teacher is compared with (MiniPLM: a small reference model; here usually the
    pruned student)."""
    data: str
    """Pool of training text (a source or a weighted mixture, as `distill --data`)."""
    tokens: Count = 512 * 1024
    """Tokens to keep (whole blocks)."""
    pool: float = 2.0
    """Score pool x --tokens tokens of the data and keep the best 1/pool of them."""
    seq_len: int = 256
    """Tokens per scored block."""
    batch_size: int = 8
    """Blocks per forward pass."""
    seed: int = 0
    """Seed of a mixture's block order (as `distill --seed`)."""
    dtype: str = "auto"
    """Weight dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    precision: str = "auto"
    """auto (bf16-mixed where the hardware has fast bf16, else fp32), bf16-mixed or fp32."""

    def __post_init__(self):
        coerce(self)
        if self.tokens < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise TailleError("--tokens and --batch-size must be at least 1, --seq-len at least 2")
        if self.pool <= 1:
            raise TailleError(f"--pool {self.pool}: must be above 1 (the share kept is 1 / pool)")
        if not str(self.out).endswith(".jsonl"):
            raise TailleError(f"--out {self.out}: give a .jsonl file")
        check_precision(self.precision)


def block_scores(teacher, reference, blocks, batch_size: int, precision: str, progress: bool = True):
    """Mean log p_teacher - log p_reference over each block's predicted tokens, (N,) float64."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from taille.data.tokens import as_ids
    from taille.models.lm import token_nll
    from taille.models.precision import autocast

    device = next(teacher.parameters()).device
    scores = np.empty(len(blocks), dtype=np.float64)
    for b in tqdm(range(0, len(blocks), batch_size), desc="select", unit="batch", disable=not progress):
        ids = as_ids(blocks[b:b + batch_size], device)  # (B, T)
        with torch.no_grad(), autocast(precision, device.type):
            gap = token_nll(reference, ids) - token_nll(teacher, ids)  # (B, T-1)
        scores[b:b + len(ids)] = gap.double().mean(-1).cpu().numpy()
    return scores


def select(s: SelectSettings, progress: bool = True) -> dict:
    """Score the pool, write the kept blocks to s.out (and s.out + .meta.json); returns the meta record."""
    import numpy as np

    from taille.data.mixture import MixedBlocks, load_blocks, parse_mixture
    from taille.data.tokens import load_tokens, tokenizer_fingerprint
    from taille.models.load import load_model, load_tokenizer, resolve_device
    from taille.models.precision import resolve_precision

    tokenizer = load_tokenizer(s.teacher)
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(load_tokenizer(s.reference)):
        raise TailleError(f"--reference {s.reference} has another tokenizer than the teacher: their log-probabilities "
                          "of the same tokens cannot be compared")
    keep = max(1, s.tokens // s.seq_len)
    wanted = int(round(keep * s.pool))
    if parse_mixture(s.data) is None:  # one source: tokenize only the pool
        blocks = load_tokens(s.data, tokenizer, split="train", max_tokens=wanted * s.seq_len,
                             progress=progress).blocks(s.seq_len)
    else:
        blocks = load_blocks(s.data, tokenizer, s.seq_len, progress=progress, seed=s.seed)
    size = min(len(blocks), wanted)
    if size <= keep:
        raise TailleError(f"--data {s.data} has {len(blocks)} blocks of {s.seq_len} tokens, not more than the {keep} "
                          f"to keep: give fewer --tokens or more data")
    if size < wanted:
        log.warning("--data %s holds %d blocks, fewer than --pool %s x %d: keeping %d of %d (1 in %.2f)", s.data,
                    len(blocks), s.pool, keep, keep, size, size / keep)
    teacher, _ = load_model(s.teacher, dtype=s.dtype, device=s.device)
    reference, _ = load_model(s.reference, dtype=s.dtype, device=s.device)
    precision = resolve_precision(s.precision, resolve_device(s.device))
    start = time.perf_counter()
    scores = block_scores(teacher, reference, blocks[:size], s.batch_size, precision, progress)
    # a mixture repeats its small sources: the same source block counts once
    same = (blocks.which[:size] * (1 << 40) + blocks.index[:size]) if isinstance(blocks, MixedBlocks) else np.arange(size)
    order = np.argsort(-scores, kind="stable")
    _, first = np.unique(same[order], return_index=True)
    kept = np.sort(order[np.sort(first)][:keep])  # the best distinct blocks, in pool order
    if len(kept) < keep:
        log.warning("the pool holds %d distinct blocks, fewer than the %d asked: keeping them all", len(kept), keep)
    out = Path(s.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in kept:
            text = tokenizer.decode(np.asarray(blocks[int(i)]).reshape(-1).tolist())  # a mixture gives (1, T)
            f.write(json.dumps({"text": text, "score": round(float(scores[i]), 6), "block": int(i)}) + "\n")
    tmp.replace(out)
    dropped = np.setdiff1d(np.arange(size), kept)

    def stats(values) -> dict:
        return {"blocks": int(len(values)), "mean": round(float(np.mean(values)), 4),
                "min": round(float(np.min(values)), 4), "max": round(float(np.max(values)), 4)} if len(values) else {}

    meta = {"settings": asdict(s), "pool_blocks": size, "distinct_blocks": int(len(first)), "kept": stats(scores[kept]),
            "dropped": stats(scores[dropped]), "seconds": round(time.perf_counter() - start, 1)}
    Path(f"{out}.meta.json").write_text(json.dumps(meta, indent=1))
    log.info("kept %d of %d blocks (score %.3f vs %.3f dropped) -> %s", len(kept), size, meta["kept"]["mean"],
             meta["dropped"].get("mean", float("nan")), out)
    return meta
