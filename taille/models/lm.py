"""Language-model heads computed in slices of tokens.

The logits of a whole batch are (B, T, V) floats: 8 x 2048 x 128k x 4 bytes = 8 GiB. Everything that only
needs a reduction of them (NLL for perplexity, KL for distillation) goes through `hidden_states` and
then applies the head `chunk` tokens at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from taille.models.arch import get_arch

LOGIT_ELEMENTS = 1 << 25
"""Logit values materialised at once (128 MiB in fp32)."""


def hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states (B, T, H) of the decoder stack, without the LM head."""
    base = model.get_submodule(get_arch(model.config).base)
    return base(input_ids=input_ids, use_cache=False).last_hidden_state


def logit_softcap(config) -> float | None:
    """The final-logit soft cap c (logits -> tanh(logits / c) * c) of families that have one."""
    attr = get_arch(config).logit_softcap
    return getattr(config, attr, None) if attr else None


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (..., V) in fp32 for hidden states (..., H), with the family's soft cap if it has one."""
    logits = model.get_submodule(get_arch(model.config).lm_head)(hidden).float()
    cap = logit_softcap(model.config)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """NLL (B, T-1) in fp32 of each next token: entry t is -log p(input_ids[:, t+1] | input_ids[:, :t+1])."""
    return hidden_nll(model, hidden_states(model, input_ids)[:, :-1], input_ids[:, 1:])


@torch.no_grad()
def hidden_nll(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL (B, T) in fp32 of `targets` (B, T) under the head applied to `hidden` (B, T, H), in slices."""
    B, T = targets.shape
    flat_hidden, flat_targets = hidden.reshape(B * T, -1), targets.reshape(B * T)
    chunk = max(1, LOGIT_ELEMENTS // model.config.vocab_size)
    nll = torch.empty(B * T, dtype=torch.float32, device=targets.device)
    for i in range(0, B * T, chunk):
        logits = head_logits(model, flat_hidden[i : i + chunk])  # (chunk, V)
        nll[i : i + chunk] = F.cross_entropy(logits, flat_targets[i : i + chunk], reduction="none")
    return nll.view(B, T)


@torch.no_grad()
def token_kl(reference, model, input_ids: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) (B, T) in fp32 at every position, the next-token distributions compared in
    slices of tokens. Both models must share the vocabulary (a reference padded larger is cut to the model's)."""
    ref_hidden = hidden_states(reference, input_ids)  # (B, T, H_ref)
    hidden = hidden_states(model, input_ids)  # (B, T, H)
    B, T = input_ids.shape
    V = model.config.vocab_size
    flat_ref, flat = ref_hidden.reshape(B * T, -1), hidden.reshape(B * T, -1)
    chunk = max(1, LOGIT_ELEMENTS // max(V, reference.config.vocab_size))
    kl = torch.empty(B * T, dtype=torch.float32, device=input_ids.device)
    for i in range(0, B * T, chunk):
        ref_logp = F.log_softmax(head_logits(reference, flat_ref[i : i + chunk])[:, :V], dim=-1)  # (chunk, V)
        logp = F.log_softmax(head_logits(model, flat[i : i + chunk]), dim=-1)
        kl[i : i + chunk] = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
    return kl.view(B, T)
