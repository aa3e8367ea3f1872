"""`taille distill --loss-on replies`: the loss counts only the tokens of the assistant's replies.

A role-play conversation is mostly its card: in the shipped role-play corpus the system prompt (name,
backstory, facts, goals) and the player's lines are about four tokens in five, the character's replies one.
With the loss on every position the student spends most of its budget learning to predict cards, which it
is never asked to write. TRL's assistant_only_loss and torchtune's train_on_input=False make the same choice
for supervised fine-tuning; here it applies to the distillation term (and --ce-weight's) alike.

A reply is the run of tokens after the chat template's assistant header (the generation prompt, found by
onpolicy.reply_marker) up to and including the end-of-turn token that closes it, so the student learns
where a reply stops as well. A source with no assistant header at all (the plays, plain text in a
mixture beside chat data) is all reply: every one of its tokens counts, as TRL's completion-only loss
applies to prompt-completion data and leaves plain language-modelling text whole. Every training block is a stretch of one source's token stream, so whether its first tokens are
inside a reply is decided by the stream before it: each source's headers and end-of-turn tokens are found
once, as positions in its stream, and a block's mask is read from them (exact across block boundaries,
with a header cut by one).

The per-step mean is over the global batch's reply tokens, counted from the data on every process alike
(no collective), as the whole-block loss is a mean over all of its tokens.
"""

from __future__ import annotations

import numpy as np

from taille.errors import TailleError

CHUNK = 1 << 24
"""Tokens of a source's stream scanned at a time when its replies are found."""


def _sources(blocks) -> list[np.ndarray]:
    from taille.data.mixture import MixedBlocks

    return list(blocks.sources) if isinstance(blocks, MixedBlocks) else [blocks]


def _holds(stream: np.ndarray, token: int) -> bool:
    """Whether `token` occurs in a 1-D token stream (read CHUNK tokens at a time)."""
    return any((np.asarray(stream[lo:lo + CHUNK]) == token).any() for lo in range(0, len(stream), CHUNK))


def reply_events(stream: np.ndarray, marker: list[int], ends: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) sorted int64 positions in a 1-D token `stream`: a reply starts at the token after each
    `marker` run and stops after each token in `ends` (stop = its position + 1)."""
    m = len(marker)
    starts, stops = [], []
    for lo in range(0, len(stream), CHUNK):
        head = max(0, lo - (m - 1))  # a marker cut by the chunk's edge is found whole here
        piece = np.asarray(stream[head:lo + CHUNK])
        if len(piece) >= m:
            hits = np.flatnonzero((np.lib.stride_tricks.sliding_window_view(piece, m) == marker).all(-1))
            starts.append(head + hits + m)  # a marker ending before lo was found by the previous chunk
        stops.append(lo + np.flatnonzero(np.isin(piece[lo - head:], ends)) + 1)
    join = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    starts = np.unique(join(starts))
    return starts, join(stops) if len(starts) else np.zeros(0, np.int64)  # no reply: its stops are not needed


def in_reply(positions: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Bool array shaped like `positions` (stream indices): whether each token is inside a reply, i.e. its
    latest reply start is not earlier than its latest stop (a header whose last token also ends a turn
    opens a reply)."""
    start_at = np.concatenate(([-2], starts))[np.searchsorted(starts, positions, side="right")]
    stop_at = np.concatenate(([-1], stops))[np.searchsorted(stops, positions, side="right")]
    return start_at >= stop_at


class ReplyMask:
    """Which tokens of a run's training blocks (an (N, T) array or a MixedBlocks) are reply tokens."""

    def __init__(self, blocks, marker: list[int], ends: list[int], turn: int | None = None):
        """`turn`: the special token that opens any chat turn (the header's first, when it is special): a
        source holding it but no assistant header is chat without replies, refused rather than counted whole."""
        from taille.data.mixture import MixedBlocks

        self.mixed = blocks if isinstance(blocks, MixedBlocks) else None
        self.names = [name for name, _ in blocks.parts] if self.mixed is not None else ["the data"]
        self.seq_len = blocks.shape[1]
        sources = _sources(blocks)
        self.events = [reply_events(b.reshape(-1), marker, ends) for b in sources]
        self.plain = [not len(starts) for starts, _ in self.events]
        """Per source: no assistant header anywhere in it, so every token counts."""
        for name, plain, b in zip(self.names, self.plain, sources):
            if plain and turn is not None and _holds(b.reshape(-1), turn):  # chat turns, none the assistant's
                raise TailleError(f"--loss-on replies: {name} holds chat turns but no assistant reply (its cards and "
                                  "player lines would all count); give it replies, or use --loss-on all")

    def __call__(self, rows) -> np.ndarray:
        """(len(rows), T) bool for the blocks at `rows` (indices into the run's blocks)."""
        rows = np.atleast_1d(np.asarray(rows))
        if self.mixed is not None:
            which, index = self.mixed.which[rows], self.mixed.index[rows]
        else:
            which, index = np.zeros(len(rows), np.int64), rows
        out = np.zeros((len(rows), self.seq_len), dtype=bool)
        offsets = np.arange(self.seq_len)
        for i, (starts, stops) in enumerate(self.events):
            mine = which == i
            if mine.any() and self.plain[i]:
                out[mine] = True
            elif mine.any():
                out[mine] = in_reply(index[mine, None] * self.seq_len + offsets, starts, stops)
        return out

    def shares(self, rows) -> dict[str, float]:
        """Per source: the share of its targets at `rows` that count (1.0 for a plain-text source)."""
        rows = np.atleast_1d(np.asarray(rows))
        which = self.mixed.which[rows] if self.mixed is not None else np.zeros(len(rows), np.int64)
        counted = self(rows)[:, 1:]
        return {name: float(counted[which == i].mean()) for i, name in enumerate(self.names) if (which == i).any()}

    def share(self, rows) -> float:
        """The share of the targets (every token but each block's first) at `rows` that are reply tokens."""
        return float(self(rows)[:, 1:].mean()) if len(np.atleast_1d(rows)) else 0.0


def reply_mask(blocks, tokenizer) -> ReplyMask:
    """The ReplyMask of `blocks` with the tokenizer's assistant header and end-of-turn tokens, refused in one
    line when the tokenizer has no chat template or the blocks hold no reply (every source plain text: the
    loss would be --loss-on all's)."""
    from taille.models.turns import stop_ids
    from taille.distill.onpolicy import reply_marker

    marker = reply_marker(tokenizer, where="--loss-on replies", instead="--loss-on all")
    turn = marker[0] if marker[0] in set(tokenizer.all_special_ids) else None
    mask = ReplyMask(blocks, marker, stop_ids(tokenizer), turn)
    if all(mask.plain):
        raise TailleError("--loss-on replies: the training data holds no assistant reply (no chat template's assistant "
                          "header in it); give chat data (a 'messages' JSONL) or use --loss-on all")
    return mask
