"""On-policy distillation (`taille distill --on-policy SHARE`): the student writes part of what it is graded on.

Off-policy distillation grades the student only on the data's tokens, i.e. on contexts the teacher (or a
corpus) wrote. At generation time the student conditions on its own tokens, and a small error it has never
been corrected on compounds: the loops a compressed student falls into ("It's old. It's old. It's old.")
are states no training block contained. Generalised knowledge distillation (GKD, Agarwal et al., ICLR 2024;
MiniLLM, Gu et al., ICLR 2024) trains on the student's own samples with the teacher's distribution at every
sampled position as the target.

taille's form keeps the block layout of the off-policy loop: in a chosen share of each step's blocks, the
last `tokens` tokens are replaced by a continuation the student samples (temperature 1, no top-p: its own
distribution) from the block's first T - tokens; the teacher then reads the whole block and the loss is the
configured divergence at every position, so the prefix is ordinary data and the tail is on-policy. The
student's samples carry no gradient (the targets are the teacher's distributions at those states).

With `--on-policy-from reply` the student's part of a block starts where a reply does: right after the first
assistant header (the chat template's generation prompt) inside the last `tokens` positions, the data's
tokens standing before it; a block with no reply starting there (plays, or a long card) keeps the fixed
tail. The correction then lands where a character's loops happen, in its replies, rather than as often in a
card's backstory or a player's line.

Which blocks are on-policy, and each one's random draws, depend only on (seed, step, the block's place in the
step's global batch): a run on N processes draws what one process draws, and a resumed run what the
uninterrupted one drew (the tokens are then the same where the logits are: in fp32; under bf16 another
batch layout can move a logit by its last bit and, rarely, a draw across a token boundary). Every process
holds the same number of on-policy blocks per micro-step and samples a fixed number of tokens (no stop at
end of turn: a block is a stretch of a token stream, and an end-of-turn token followed by more text is what
the stream holds too), so FSDP's gathers stay in step.
"""

from __future__ import annotations

import numpy as np
import torch

from taille.models.arch import get_arch
from taille.models.lm import head_logits


def on_policy_places(count: int, share: float, batch_size: int) -> np.ndarray:
    """(count,) bool: which of a global batch's `count` places are on-policy, for a share
    that is k / batch_size blocks of each micro-batch (the settings refuse any other). Spread evenly in
    integers (place j is on-policy when floor((j + 1) k / B) > floor(j k / B)), so every slice of
    batch_size places, i.e. every process's micro-batch, holds exactly k: the same count on every process,
    and the same places after a resume that splits the global batch differently."""
    k = round(share * batch_size)
    places = np.arange(count)
    return (places + 1) * k // batch_size > places * k // batch_size


def place_generators(seed: int, step: int, places) -> list[torch.Generator]:
    """One CPU generator per on-policy block, seeded from (seed, step, place in the global batch)."""
    generators = []
    for place in places:
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([seed, step, int(place)]).generate_state(1, np.uint64)[0] >> 1))
        generators.append(g)
    return generators


def reply_marker(tokenizer, where: str = "--on-policy-from reply", instead: str = "--on-policy-from end") -> list[int]:
    """The token ids of the chat template's assistant header (what add_generation_prompt appends), checked to
    tokenize the same inside a rendered conversation; refused in one line when the template has none (`where`
    names the option that needs it, `instead` the one to use then)."""
    from taille.errors import TailleError

    turn = [{"role": "user", "content": "Good morning."}]
    if not getattr(tokenizer, "chat_template", None):
        raise TailleError(f"{where}: the student's tokenizer has no chat template to find replies by; use {instead}")
    bare = tokenizer.apply_chat_template(turn, tokenize=False)
    prompted = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    header = prompted[len(bare):] if prompted.startswith(bare) else ""
    marker = tokenizer(header, add_special_tokens=False)["input_ids"] if header else []
    whole = tokenizer.apply_chat_template([*turn, {"role": "assistant", "content": "Welcome, traveller."}], tokenize=False)
    ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
    found = sum(ids[i:i + len(marker)] == marker for i in range(len(ids))) if marker else 0
    if found != 1:
        raise TailleError(f"{where}: this chat template's assistant header ({header!r}) is not a fixed run of tokens "
                          f"inside a conversation; use {instead}")
    return marker


def tail_starts(ids: torch.Tensor, tokens: int, marker: list[int] | None) -> torch.Tensor:
    """(B,) the position where each block's sampled part begins: the first position within the last `tokens`
    that follows `marker` (a reply's first token), else (or without a marker) T - tokens."""
    B, T = ids.shape
    starts = torch.full((B,), T - tokens, dtype=torch.long, device=ids.device)
    m = len(marker or ())
    if not m or T < m:
        return starts
    hits = (ids.unfold(1, m, 1) == torch.tensor(marker, device=ids.device)).all(-1)  # (B, T - m + 1): marker at j
    after = torch.arange(m, T + 1, device=ids.device)  # the position after a marker at j
    hits &= (after >= T - tokens) & (after <= T - 1)
    found = hits.any(1)
    starts[found] = after[hits.float().argmax(1)[found]]  # the first hit of each row
    return starts


def draw(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """(B,) one token per row of `logits` (B, V), drawn from softmax(logits) by inverting its cumulative
    distribution at one fp64 uniform from the row's own generator: a row's token does not depend on the
    other rows, and the draw costs one random number, not V."""
    u = torch.tensor([torch.rand((), generator=g, dtype=torch.float64).item() for g in generators],
                     dtype=torch.float64, device=logits.device)  # (B,)
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(dim=-1)  # (B, V)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1).clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def sample_tail(lm, prefix: torch.Tensor, new_tokens: int, generators: list[torch.Generator],
                forced: torch.Tensor | None = None) -> torch.Tensor:
    """(B, new_tokens) tokens sampled from `lm` (temperature 1) after `prefix` (B, P), with its KV cache,
    each row from its own generator (`draw`). `forced` (B, new_tokens): where it holds a token id (>= 0),
    that token is taken instead of a draw (the data before a row's reply begins); a row's generator is
    drawn from only where it samples, so its tokens do not depend on the rows beside it."""
    from transformers import DynamicCache

    base = lm.get_submodule(get_arch(lm.config).base)
    # the cache fills in place; passed by position, where every family's forward takes it (its keyword was
    # renamed from past_key_values to cache within transformers 5)
    cache = DynamicCache(config=lm.config)
    hidden = base(prefix, None, None, cache, use_cache=True).last_hidden_state  # (B, P, H)
    tokens = []
    if forced is None:
        forced = torch.full((prefix.shape[0], new_tokens), -1, dtype=torch.long, device=prefix.device)
    for i in range(new_tokens):
        token = forced[:, i].clone()  # (B,)
        free = torch.nonzero(token < 0).flatten().tolist()
        if free:
            token[free] = draw(head_logits(lm, hidden[free, -1]), [generators[r] for r in free])
        tokens.append(token)
        if i + 1 < new_tokens:
            hidden = base(tokens[-1][:, None], None, None, cache, use_cache=True).last_hidden_state  # (B, 1, H)
    return torch.stack(tokens, dim=1)
