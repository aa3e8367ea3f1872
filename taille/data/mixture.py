"""Several sources as one stream of training blocks: `--data shakespeare:0.3,gen.jsonl:0.7`.

Each source is tokenized (and cached) on its own and cut into blocks; the mixture is a list of
(source, block) pairs interleaved deterministically so that after any k blocks each source has given
its weight's share (rounded): at each position the source furthest behind its share goes next. Within a
source the blocks come in a seeded shuffle, a fresh one per pass, so no block comes twice before all of
its source has come once. The mixture's length is the sum of the sources' blocks; a source whose share is
larger than its text makes several passes, one whose share is smaller gives part of one. A run reads the
mixture in sequence (it is shuffled already), so every prefix of a run holds the shares too. The same
spec, tokenizer and seed give the same blocks in the same order on every machine; a run records
`trained_on()`: what it drew of each source.
"""

from __future__ import annotations

import re

import numpy as np

from taille.errors import TailleError

_WEIGHT = re.compile(r"^(?P<source>.+):(?P<weight>\d+(\.\d*)?|\.\d+)$")


def parse_mixture(spec: str) -> list[tuple[str, float]] | None:
    """'a:0.3,b:0.7' -> [('a', 0.3), ('b', 0.7)]; None when `spec` is one plain source. Weights are
    relative (normalised here); every item needs one."""
    items = [item.strip() for item in str(spec).split(",")]
    matches = [_WEIGHT.match(item) for item in items]
    if not any(matches):
        return None
    if not all(matches):
        bad = next(item for item, m in zip(items, matches) if not m)
        raise TailleError(f"--data {spec}: in a mixture every source needs a weight (SOURCE:WEIGHT); '{bad}' has none")
    parts = [(m["source"], float(m["weight"])) for m in matches]
    total = sum(w for _, w in parts)
    if total <= 0 or any(w < 0 for _, w in parts):
        raise TailleError(f"--data {spec}: weights must be non-negative and not all 0")
    return [(s, w / total) for s, w in parts if w > 0]


def auto_held_out(data: str) -> str | None:
    """What `--eval-data auto` scores on for training data `data`: the held-out plays when the plays are
    trained on, alone or in a mixture; else nothing."""
    parts = [spec for spec, _ in parse_mixture(data) or [(data, 1.0)]]
    return "shakespeare:heldout" if any(str(spec).split(":")[0] == "shakespeare" for spec in parts) else None


def interleave(weights: list[float], length: int) -> np.ndarray:
    """(length,) source index per position: each position goes to the source furthest behind its share."""
    w = np.asarray(weights, dtype=np.float64)
    taken = np.zeros(len(w))
    out = np.empty(length, dtype=np.int64)
    for k in range(length):
        i = int(np.argmax(w * (k + 1) - taken))
        out[k] = i
        taken[i] += 1
    return out


class MixedBlocks:
    """(N, seq_len) blocks drawn from several sources' block arrays; indexable like one array."""

    def __init__(self, parts: list[tuple[str, float]], blocks: list[np.ndarray], seed: int = 0):
        self.parts = parts
        self.sources = blocks
        length = sum(len(b) for b in blocks)
        self.which = interleave([w for _, w in parts], length)  # (N,) source of each mixed block
        self.index = np.empty(length, dtype=np.int64)  # (N,) block within its source
        for i, b in enumerate(blocks):
            positions = np.flatnonzero(self.which == i)
            passes = -(-len(positions) // len(b))
            shuffled = [np.random.default_rng([seed, i, p]).permutation(len(b)) for p in range(passes)]
            self.index[positions] = np.concatenate(shuffled)[:len(positions)]  # a fresh shuffle per pass
        self.shape = (length, blocks[0].shape[1])
        self.dtype = np.result_type(*[b.dtype for b in blocks])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.atleast_1d(np.asarray(rows))
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)  # (B, seq_len)
        which = self.which[rows]
        for i, source in enumerate(self.sources):
            mine = which == i
            if mine.any():
                out[mine] = source[self.index[rows[mine]]]
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out.astype(dtype) if dtype is not None else out

    def describe(self) -> list[dict]:
        """Per source: weight, its own blocks, blocks it gives the mixture, and the passes over its text
        that the whole mixture holds."""
        out = []
        for i, ((spec, weight), b) in enumerate(zip(self.parts, self.sources)):
            used = int((self.which == i).sum())
            out.append({"source": spec, "weight": round(weight, 6), "blocks": len(b), "mixture_blocks": used,
                        "mixture_passes": round(used / len(b), 3)})
        return out


def run_order(blocks, seed: int, first: int, count: int) -> np.ndarray:
    """(count,) indices into `blocks` of a run's global samples first..first+count-1. A mixture is shuffled
    already and read in sequence (a later epoch reads it again); one source's blocks are visited in a fresh
    seeded permutation per epoch, so any sample's block is known without replaying the run."""
    if isinstance(blocks, MixedBlocks):
        return np.arange(first, first + count) % len(blocks)
    out = np.empty(count, dtype=np.int64)
    for j, g in enumerate(range(first, first + count)):
        epoch, pos = divmod(g, len(blocks))
        if j == 0 or pos == 0:
            perm = np.random.default_rng([seed, epoch]).permutation(len(blocks))
        out[j] = perm[pos]
    return out


def trained_on(blocks, order: np.ndarray, source: str) -> list[dict]:
    """What a run drew, per source, given its samples `order` (indices into `blocks`, the whole run):
    blocks drawn (repeats counted), distinct blocks, passes over the source's text (drawn / its blocks).
    A run shorter than its mixture samples from all of it, so these, not the mixture's, are what it saw."""
    if not isinstance(blocks, MixedBlocks):
        return [{"source": source, "blocks": len(blocks), "drawn": len(order),
                 "distinct": len(np.unique(order)), "passes": round(len(order) / len(blocks), 3)}]
    out = blocks.describe()
    which = blocks.which[order]  # (S,) source of each drawn sample
    for i, part in enumerate(out):
        mine = blocks.index[order[which == i]]  # (S_i,) block within source i
        part |= {"drawn": len(mine), "distinct": len(np.unique(mine)), "passes": round(len(mine) / part["blocks"], 3)}
    return out


def load_blocks(spec: str, tokenizer, seq_len: int, split: str = "train", progress: bool = True, seed: int = 0):
    """Training blocks of `spec`: one source's (N, seq_len) view, or a MixedBlocks for a weighted list."""
    from taille.data.tokens import load_tokens

    parts = parse_mixture(spec)
    if parts is None:
        return load_tokens(spec, tokenizer, split=split, progress=progress).blocks(seq_len)
    blocks = [load_tokens(s, tokenizer, split=split, progress=progress).blocks(seq_len) for s, _ in parts]
    return MixedBlocks(parts, blocks, seed)
