"""The offline teacher: its top-K next-token distributions over a corpus, computed once.

`taille teacher-cache` runs the teacher over every block of the data and stores, per predicted position,
the K largest log-probabilities (fp16), their token ids (int32) and the log of the probability mass left
outside them (fp32), in memory-mapped files beside the token blocks themselves. `distill --teacher-cache`
then trains with no teacher in memory, which makes comparing many students cheap. `--from` cuts a
smaller-K cache out of a larger one without the teacher.

`--sampling random` stores K draws from the teacher's distribution instead (Sparse Logit Sampling,
Anshumann et al., ACL 2025): the distinct ids drawn with log(count / K) and no mass outside them. That
empirical distribution is an unbiased estimate of the teacher's, so the student's gradient (softmax - p)
is unbiased, where a top-K cache always leaves the tail out; the same files and the same loss read both.

Layout of DIR: meta.json, blocks.npy (N, T) token ids, top_logp.f16 (N, T-1, K), top_idx.i32 (N, T-1, K),
rest_logp.f32 (N, T-1).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from taille.distill.config import SAMPLINGS
from taille.distill.losses import log_mass_outside
from taille.errors import TailleError


@dataclass
class TeacherCache:
    blocks: np.ndarray
    """(N, T) token ids."""
    top_logp: np.ndarray
    """(N, T-1, K) fp16."""
    top_idx: np.ndarray
    """(N, T-1, K) int32."""
    rest_logp: np.ndarray
    """(N, T-1) fp32."""
    meta: dict

    def batch(self, rows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flattened (B*(T-1), K), (B*(T-1), K), (B*(T-1),) teacher tensors for blocks `rows`."""
        K = self.top_logp.shape[-1]
        return (torch.from_numpy(self.top_logp[rows].astype(np.float32)).reshape(-1, K).to(device),
                torch.from_numpy(self.top_idx[rows].astype(np.int64)).reshape(-1, K).to(device),
                torch.from_numpy(self.rest_logp[rows]).reshape(-1).to(device))

    def check_fits(self, vocab: int, folder: str) -> None:
        """Refuse a cache holding a token id the student has no logit for: a teacher whose output rows are
        padded past the tokenizer (Qwen2.5 7B's 152,064 against 0.5B's 151,936) can rank a padding row among
        its K (more often in a sampled cache); the loss would index past the student's head. Read only when
        the cache's vocabulary is the larger, one block range at a time (memory-mapped)."""
        if self.meta.get("vocab", vocab) <= vocab:
            return
        step = max(1, (1 << 24) // max(1, self.top_idx[0].size))  # ~64 MiB of ids per read
        for start in range(0, len(self.top_idx), step):
            largest = int(self.top_idx[start:start + step].max())
            if largest >= vocab:
                raise TailleError(
                    f"--teacher-cache {folder} holds token id {largest}, past the student's vocabulary ({vocab}): "
                    f"the teacher's output is padded to {self.meta['vocab']} rows and ranked a padding row among its "
                    "K; distil from the live --teacher, whose logits are cut to the student's vocabulary")


def _paths(folder: Path) -> dict[str, Path]:
    return {name: folder / name for name in ("meta.json", "blocks.npy", "top_logp.f16", "top_idx.i32", "rest_logp.f32")}


EMPTY_LOGP = -1e4
"""Stored log-probability of an id that holds no mass (exp underflows to 0 in fp32; -inf would make 0 * inf)."""


def sampled_frequencies(logp: torch.Tensor, draws: int, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """`draws` ids drawn with replacement from each row of log-probs (N, V): ((N, draws) log(count / draws)
    of the distinct ids drawn, EMPTY_LOGP after them; (N, draws) ids, all distinct within a row, the drawn
    ones first, then the likeliest undrawn ids). The frequencies' expectation is exp(logp): an unbiased
    estimate of the distribution."""
    probs = logp.float().exp()  # (N, V)
    picked = torch.multinomial(probs, draws, replacement=True, generator=generator)  # (N, draws)
    # counts + p / 2: the drawn ids first, by count; then the undrawn ones by the teacher's probability (halved,
    # so that a count plus a probability near 1 never rounds up to the next count in fp32)
    ranked = probs.mul_(0.5).scatter_add_(-1, picked, torch.ones_like(picked, dtype=probs.dtype))  # (N, V), in place
    rank, index = ranked.topk(draws, dim=-1)
    freq = (rank.floor() / draws).log().clamp(min=EMPTY_LOGP)
    return freq, index


@torch.no_grad()
def build_cache(teacher, tokenizer, data: str, out: str | Path, top_k: int = 128, seq_len: int = 512,
                max_tokens: int | None = None, batch_size: int = 8, precision: str = "fp32", progress: bool = True,
                temperature: float = 1.0, sampling: str = "top", seed: int = 0) -> Path:
    """The teacher's top-`top_k` log-probabilities at `temperature` over every block of `data` (a distillation at
    another temperature refuses the cache: the outside mass cannot be re-tempered); with sampling "random",
    the frequencies of `top_k` draws from it (block i drawn from a stream of (seed, i): reproducible)."""
    from tqdm.auto import tqdm

    from taille.data.tokens import as_ids, load_tokens, tokenizer_fingerprint
    from taille.models.lm import head_logits, hidden_states
    from taille.data.mixture import load_blocks, parse_mixture
    from taille.models.precision import autocast

    V = teacher.config.vocab_size
    if not 1 <= top_k <= V:
        raise TailleError(f"--top-k {top_k}: between 1 and the vocabulary size {V}")
    if sampling not in SAMPLINGS:
        raise TailleError(f"--sampling {sampling}: one of {', '.join(SAMPLINGS)}")
    if parse_mixture(data) is not None:  # several weighted sources: the first blocks of their mixture
        mixed = load_blocks(data, tokenizer, seq_len, progress=progress)
        blocks, source = mixed[: (max_tokens // seq_len) if max_tokens else len(mixed)], data
    else:
        stream = load_tokens(data, tokenizer, split="train", max_tokens=max_tokens, progress=progress)
        blocks, source = np.ascontiguousarray(stream.blocks(seq_len)), stream.meta["source"]
    N, T = blocks.shape
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = _paths(folder)
    paths["meta.json"].unlink(missing_ok=True)  # the meta file appearing marks the cache complete
    np.save(paths["blocks.npy"], blocks)
    top_logp = np.memmap(paths["top_logp.f16"], dtype=np.float16, mode="w+", shape=(N, T - 1, top_k))
    top_idx = np.memmap(paths["top_idx.i32"], dtype=np.int32, mode="w+", shape=(N, T - 1, top_k))
    rest = np.memmap(paths["rest_logp.f32"], dtype=np.float32, mode="w+", shape=(N, T - 1))
    device = next(teacher.parameters()).device
    start = time.perf_counter()
    for b in tqdm(range(0, N, batch_size), desc="teacher cache", unit="batch", disable=not progress):
        ids = as_ids(blocks[b:b + batch_size], device)  # (B, T)
        with autocast(precision, device.type):
            hidden = hidden_states(teacher, ids)[:, :-1]  # (B, T-1, H)
        for i in range(hidden.shape[0]):  # one block at a time: (T-1, V) logits
            logp = F.log_softmax(head_logits(teacher, hidden[i]) / temperature, dim=-1)  # (T-1, V)
            if sampling == "random":
                # one stream per (seed, block), none shared between seeds (the CPU generator keeps 32 bits)
                state = int(np.random.SeedSequence([seed, b + i]).generate_state(1)[0])
                generator = torch.Generator(device).manual_seed(state)
                values, index = sampled_frequencies(logp, top_k, generator)  # (T-1, K)
                rest[b + i] = EMPTY_LOGP
            else:
                values, index = logp.topk(top_k, dim=-1)  # (T-1, K)
                rest[b + i] = log_mass_outside(logp, index).clamp(min=EMPTY_LOGP).cpu().numpy()
            top_logp[b + i] = values.cpu().numpy().astype(np.float16)
            top_idx[b + i] = index.cpu().numpy().astype(np.int32)
    for array in (top_logp, top_idx, rest):
        array.flush()
    meta = {"teacher": str(getattr(teacher.config, "name_or_path", "")), "data": source,
            "tokenizer": tokenizer_fingerprint(tokenizer), "top_k": top_k, "seq_len": seq_len, "blocks": N,
            "vocab": V, "precision": precision, "temperature": temperature, "sampling": sampling,
            **({"seed": seed} if sampling == "random" else {}), "seconds": round(time.perf_counter() - start, 1),
            "bytes": sum(p.stat().st_size for p in paths.values() if p.exists())}
    tmp = paths["meta.json"].with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, paths["meta.json"])
    return folder


def shrink_cache(source: str | Path, out: str | Path, top_k: int, rows_per_chunk: int = 64) -> Path:
    """A top-`top_k` cache cut from a larger one, with no teacher: its first K columns (top-k keeps them
    sorted), and the mass outside them = the source's remaining mass + its dropped columns, summed in log space
    (exact, not 1 - kept, which cancels when the kept mass is near 1). One teacher pass then serves every K."""
    src = open_cache(source)
    K = src.meta["top_k"]
    if src.meta.get("sampling", "top") != "top":
        raise TailleError(f"--from {source}: a sampled cache's first columns are not a smaller sample; build a "
                          f"sampled cache with --top-k {top_k} from the teacher instead")
    if not 1 <= top_k <= K:
        raise TailleError(f"--top-k {top_k}: a cache of top-{K} can give 1 to {K} log-probabilities per position")
    folder = Path(out)
    if folder.resolve() == Path(source).resolve():
        raise TailleError("--out must be another folder than --from")
    folder.mkdir(parents=True, exist_ok=True)
    paths = _paths(folder)
    paths["meta.json"].unlink(missing_ok=True)
    start = time.perf_counter()
    np.save(paths["blocks.npy"], np.asarray(src.blocks))
    N, T1 = src.rest_logp.shape
    top_logp = np.memmap(paths["top_logp.f16"], dtype=np.float16, mode="w+", shape=(N, T1, top_k))
    top_idx = np.memmap(paths["top_idx.i32"], dtype=np.int32, mode="w+", shape=(N, T1, top_k))
    rest = np.memmap(paths["rest_logp.f32"], dtype=np.float32, mode="w+", shape=(N, T1))
    for b in range(0, N, rows_per_chunk):
        rows = slice(b, b + rows_per_chunk)
        top_logp[rows] = src.top_logp[rows, :, :top_k]
        top_idx[rows] = src.top_idx[rows, :, :top_k]
        dropped = torch.from_numpy(src.top_logp[rows, :, top_k:].astype(np.float32))  # (n, T-1, K - k)
        kept_out = torch.from_numpy(np.array(src.rest_logp[rows]))[..., None]  # (n, T-1, 1)
        rest[rows] = torch.logsumexp(torch.cat([kept_out, dropped], dim=-1), dim=-1).clamp(min=EMPTY_LOGP).numpy()
    for array in (top_logp, top_idx, rest):
        array.flush()
    meta = {**src.meta, "top_k": top_k, "from": str(Path(source).resolve()), "seconds": round(time.perf_counter() - start, 1)}
    meta["bytes"] = sum(p.stat().st_size for name, p in paths.items() if name != "meta.json")
    tmp = paths["meta.json"].with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, paths["meta.json"])
    return folder


def open_cache(folder: str | Path, tokenizer=None) -> TeacherCache:
    from taille.data.tokens import tokenizer_fingerprint

    paths = _paths(Path(folder))
    if not paths["meta.json"].is_file():
        raise TailleError(f"--teacher-cache {folder}: no complete cache here (build one with `taille teacher-cache`)")
    meta = json.loads(paths["meta.json"].read_text())
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != meta["tokenizer"]:
        raise TailleError(f"--teacher-cache {folder} was built with another tokenizer than the student's")
    N, T, K = meta["blocks"], meta["seq_len"], meta["top_k"]
    return TeacherCache(
        blocks=np.load(paths["blocks.npy"], mmap_mode="r"),
        top_logp=np.memmap(paths["top_logp.f16"], dtype=np.float16, mode="r", shape=(N, T - 1, K)),
        top_idx=np.memmap(paths["top_idx.i32"], dtype=np.int32, mode="r", shape=(N, T - 1, K)),
        rest_logp=np.memmap(paths["rest_logp.f32"], dtype=np.float32, mode="r", shape=(N, T - 1)),
        meta=meta,
    )
