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

Which blocks are on-policy, and each one's random draws, depend only on (seed, step, the block's place in the
step's global batch): a run on N processes samples what one process samples, and a resumed run what the
uninterrupted one sampled. Every process holds the same number of on-policy blocks per micro-step and
samples a fixed number of tokens (no stop at end of turn: a block is a stretch of a token stream, and an
end-of-turn token followed by more text is what the stream holds too), so FSDP's gathers stay in step.
"""

from __future__ import annotations

import numpy as np
import torch

from taille.models.arch import get_arch
from taille.models.lm import head_logits


def on_policy_places(first: int, count: int, share: float) -> np.ndarray:
    """(count,) bool: which of the global batch's places first..first+count-1 are on-policy. Spread evenly
    (place j is on-policy when floor((j + 1) * share) > floor(j * share)), so any run of 1/share places
    holds one, and a slice of batch_size places holds share * batch_size of them when that is whole."""
    places = np.arange(first, first + count)
    # exact in rationals for the shares the settings allow (k / batch_size): round before flooring
    return np.floor(np.round((places + 1) * share, 9)) > np.floor(np.round(places * share, 9))


def place_generators(seed: int, step: int, places) -> list[torch.Generator]:
    """One CPU generator per on-policy block, seeded from (seed, step, place in the global batch)."""
    generators = []
    for place in places:
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([seed, step, int(place)]).generate_state(1, np.uint64)[0] >> 1))
        generators.append(g)
    return generators


@torch.no_grad()
def sample_tail(lm, prefix: torch.Tensor, new_tokens: int, generators: list[torch.Generator]) -> torch.Tensor:
    """(B, new_tokens) tokens sampled from `lm` after `prefix` (B, P), with its KV cache. Each row draws
    Gumbel-max noise from its own generator (argmax(logits - log(-log u)) is a draw from softmax(logits)),
    so a row's tokens do not depend on which other rows share its batch."""
    from transformers import DynamicCache

    base = lm.get_submodule(get_arch(lm.config).base)
    # the cache fills in place; passed by position, where every family's forward takes it (its keyword was
    # renamed from past_key_values to cache within transformers 5)
    cache = DynamicCache(config=lm.config)
    hidden = base(prefix, None, None, cache, use_cache=True).last_hidden_state  # (B, P, H)
    logits = head_logits(lm, hidden[:, -1])  # (B, V) fp32
    tokens = []
    for i in range(new_tokens):
        u = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in generators]).to(logits.device)  # (B, V)
        next_token = (logits - torch.log(-torch.log(u))).argmax(-1)  # (B,)
        tokens.append(next_token)
        if i + 1 < new_tokens:
            hidden = base(next_token[:, None], None, None, cache, use_cache=True).last_hidden_state  # (B, 1, H)
            logits = head_logits(lm, hidden[:, -1])
    return torch.stack(tokens, dim=1)
