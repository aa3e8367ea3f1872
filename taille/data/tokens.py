"""Tokenize a source once into a flat token stream on disk, and view it as fixed-length blocks.

The stream is a raw uint16/uint32 file in the cache, keyed by the tokenizer and the source (files'
sizes and mtimes), written piece by piece so a billion-token corpus never sits in RAM, and memory-mapped
on every later run. Blocks of any length are views of the same stream, so one tokenization serves every
`--seq-len`.

Documents are joined as  [BOS] doc EOS [BOS] doc ... : EOS between documents (none after the last),
BOS at each document's start only for tokenizers that add one themselves (Llama 3, Gemma).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taille.data.sources import TextSource, documents, parse_source
from taille.errors import TailleError
from taille.paths import cache_dir

log = logging.getLogger(__name__)

FORMAT = 1
"""Bump when the layout of the cached stream changes."""
BATCH_CHARS = 8 << 20
"""Text handed to the tokenizer at once (it parallelises inside a batch)."""


@dataclass
class TokenStream:
    tokens: np.ndarray
    """(N,) token ids, memory-mapped."""
    path: Path
    meta: dict

    def __len__(self) -> int:
        return len(self.tokens)

    def blocks(self, seq_len: int) -> np.ndarray:
        """(N // seq_len, seq_len) view: consecutive non-overlapping blocks; the tail is dropped."""
        n = len(self.tokens) // seq_len
        if n == 0:
            raise TailleError(
                f"{self.meta['source']} has {len(self.tokens):,} tokens, fewer than one block of {seq_len}; "
                "lower --seq-len or give more text"
            )
        return self.tokens[: n * seq_len].reshape(n, seq_len)


def as_ids(rows: np.ndarray, device="cpu"):
    """Token blocks (B, T) of any unsigned dtype as an int64 tensor on `device`."""
    import torch

    return torch.from_numpy(np.asarray(rows).astype(np.int64)).to(device)


def batches(blocks: np.ndarray, batch_size: int, device="cpu"):
    """Consecutive (B, T) int64 batches of `blocks`, the last one possibly smaller."""
    for b in range(0, len(blocks), batch_size):
        yield as_ids(blocks[b:b + batch_size], device)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = f"|{tokenizer.chat_template}|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}"
    return hashlib.sha256((body + extra).encode()).hexdigest()[:16]


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def load_tokens(
    data: str | TextSource, tokenizer, split: str = "train", max_tokens: int | None = None, progress: bool = True
) -> TokenStream:
    """The token stream of `data` (a spec or a parsed source), from the cache or tokenized now.
    `max_tokens` stops early (needed for streamed Hub datasets); it is part of the cache key."""
    source = parse_source(data, split) if isinstance(data, str) else data
    key = hashlib.sha256(
        f"{FORMAT}|{tokenizer_fingerprint(tokenizer)}|{source.fingerprint()}|{max_tokens}".encode()
    ).hexdigest()[:20]
    folder = cache_dir("tokens")
    bin_path, meta_path = folder / f"{key}.bin", folder / f"{key}.json"
    if meta_path.is_file() and bin_path.is_file():
        meta = json.loads(meta_path.read_text())
        log.info("reusing tokenized %s (%s tokens) from %s", source.name, f"{meta['tokens']:,}", bin_path)
        return TokenStream(np.memmap(bin_path, dtype=meta["dtype"], mode="r"), bin_path, meta)
    meta = _tokenize_to_file(source, tokenizer, bin_path, max_tokens, progress)
    tmp = meta_path.with_suffix(f".json.{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)  # the meta file appearing is what marks the stream complete
    return TokenStream(np.memmap(bin_path, dtype=meta["dtype"], mode="r"), bin_path, meta)


def _tokenize_to_file(source: TextSource, tokenizer, bin_path: Path, max_tokens: int | None, progress: bool) -> dict:
    from tqdm.auto import tqdm

    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    if eos is None:
        raise TailleError("the tokenizer has no EOS token, which taille puts between documents")
    start, n_tokens, n_docs = time.perf_counter(), 0, 0
    tmp = bin_path.with_suffix(f".bin.{os.getpid()}")
    bar = tqdm(desc=f"tokenizing {source.name}", unit="tok", unit_scale=True, disable=not progress)
    pieces: list[tuple[str, bool, bool]] = []  # (text, starts_document, ends_document)

    def flush(f) -> None:
        nonlocal n_tokens, n_docs
        encoded = tokenizer([text for text, _, _ in pieces], add_special_tokens=False)["input_ids"]
        out: list[int] = []
        for ids, (_, starts, ends) in zip(encoded, pieces):
            if starts:
                if n_docs:
                    out.append(eos)  # between documents, never after the last
                if bos is not None:
                    out.append(bos)
            out.extend(ids)
            n_docs += ends
        if max_tokens is not None:
            out = out[: max_tokens - n_tokens]
        np.asarray(out, dtype=dtype).tofile(f)
        n_tokens += len(out)
        bar.update(len(out))
        pieces.clear()

    try:
        with open(tmp, "wb") as f:
            chars, starts, seen_text = 0, True, False
            for text, ends in documents(source, tokenizer):
                if starts and ends and not text.strip():
                    continue  # an empty document adds nothing, not even a separator
                seen_text = seen_text or bool(text.strip())
                pieces.append((text, starts, ends))
                starts = ends
                chars += len(text)
                if chars >= BATCH_CHARS:
                    flush(f)
                    chars = 0
                    if max_tokens is not None and n_tokens >= max_tokens:
                        break
            if pieces:
                flush(f)
        if n_tokens == 0 or not seen_text:
            raise TailleError(f"{source.name}: no text found (empty files or empty fields)")
        os.replace(tmp, bin_path)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    log.info("tokenized %s: %s tokens in %.1f s", source.name, f"{n_tokens:,}", seconds)
    return {
        "source": source.name, "kind": source.kind, "split": source.split, "tokens": n_tokens,
        "documents": n_docs, "dtype": np.dtype(dtype).name, "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "eos": eos, "bos": bos, "max_tokens": max_tokens, "seconds": round(seconds, 3), "format": FORMAT,
    }
