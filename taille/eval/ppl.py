"""Perplexity over a token stream with a sliding window.

Windows of `window` tokens start every `stride` tokens. Each token is predicted exactly once: in the
first window that contains it with at least one token of context, and only the tokens that earlier
windows have not scored count in a window. stride == window gives non-overlapping windows (fastest;
the first token of each window is not scored); stride < window gives every scored token at least
window - stride tokens of context (closer to the model's true perplexity, window / stride times the
compute). The first token of the stream is never scored.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from taille.data.tokens import as_ids
from taille.errors import TailleError
from taille.models.lm import token_nll
from taille.models.precision import autocast


@dataclass
class Perplexity:
    source: str
    ppl: float
    nll: float
    """Mean negative log-likelihood (nats per token)."""
    scored_tokens: int
    window: int
    stride: int
    windows: int
    precision: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window: positions first_scored..end-1 are predicted in it."""
    if not 0 < stride <= window:
        raise TailleError(f"--stride must be between 1 and --window ({window}), got {stride}")
    if n_tokens < 2:
        raise TailleError(f"perplexity needs at least 2 tokens, the text has {n_tokens}")
    spans, scored_until = [], 1  # token 0 has no context
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + window, n_tokens)
        first = max(begin + 1, scored_until)
        if first < end:
            spans.append((begin, end, first))
        scored_until = end
        if end == n_tokens:
            break
    return spans


@torch.no_grad()
def perplexity(
    model, tokens: np.ndarray, window: int = 1024, stride: int | None = None, batch_size: int = 4,
    source: str = "", precision: str = "fp32", progress: bool = True,
) -> Perplexity:
    """Perplexity of `model` on `tokens` (a 1-D array, e.g. a TokenStream's memmap)."""
    from tqdm.auto import tqdm

    stride = stride or window
    spans = windows(len(tokens), window, stride)
    device = next(model.parameters()).device
    total_nll, total_scored, start = torch.zeros((), dtype=torch.float64, device=device), 0, time.perf_counter()
    # Windows of equal length batch together; only the last one can be shorter.
    groups: list[list[tuple[int, int, int]]] = []
    for span in spans:
        if groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == span[1] - span[0]:
            groups[-1].append(span)
        else:
            groups.append([span])
    bar = tqdm(total=len(spans), desc=f"perplexity {source}".strip(), unit="win", disable=not progress)
    for group in groups:
        ids = as_ids(np.stack([tokens[b:e] for b, e, _ in group]), device)  # (B, T)
        with autocast(precision, device.type):
            nll = token_nll(model, ids)  # (B, T-1): entry t predicts token begin + t + 1
        positions = torch.arange(1, ids.shape[1], device=device)  # (T-1,) offsets of predicted tokens
        firsts = torch.tensor([f - b for b, _, f in group], device=device)  # (B,)
        scored = positions[None, :] >= firsts[:, None]  # (B, T-1)
        total_nll += (nll * scored).sum(dtype=torch.float64)
        total_scored += sum(e - f for _, e, f in group)
        bar.update(len(group))
    bar.close()
    mean_nll = float(total_nll) / total_scored  # one sync, at the end
    return Perplexity(
        source=source, ppl=math.exp(mean_nll), nll=mean_nll, scored_tokens=total_scored, window=window,
        stride=stride, windows=len(spans), precision=precision, seconds=round(time.perf_counter() - start, 2),
    )
