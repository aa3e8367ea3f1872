"""Distillation losses on logits, computed in slices of tokens.

A (B, T, V) logits tensor at V = 131k-256k does not fit next to a model, so losses take final hidden
states and the heads, and apply the heads `chunk` tokens at a time. Each slice runs under activation
checkpointing: its logits are rebuilt during backward instead of being kept, so memory holds one slice
of logits at a time in both passes.

Per-token divergences between the teacher distribution p and the student distribution q (temperature t
applied to both sets of logits):
  fkl   forward KL(p || q)                       Minitron's default, at t = 1
  rkl   reverse KL(q || p)
  jsd   generalised JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q;
        beta -> 0 tends to a scaled forward KL and beta -> 1 to a scaled reverse KL (as in GKD)
  ce    cross-entropy of the student on the next token (the data's own labels)
Sums over real tokens are returned with their count, so callers normalise by the number of real tokens
across accumulation steps and processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from taille.errors import TailleError

KINDS = ("fkl", "rkl", "jsd")
LOGIT_ELEMENTS = 1 << 24
"""Logit values per slice (64 MiB in fp32): the chunk is this divided by the vocabulary."""


@dataclass(frozen=True)
class LossConfig:
    kind: str = "fkl"
    """fkl (forward KL, Minitron), rkl (reverse KL) or jsd (generalised JSD)."""
    beta: float = 0.5
    """JSD interpolation."""
    temperature: float = 1.0
    ce_weight: float = 0.0
    """Weight of the cross-entropy term on the data's next tokens (0: pure distillation)."""
    kd_weight: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TailleError(f"--loss {self.kind}: use one of {', '.join(KINDS)}")
        if not 0 < self.beta < 1:
            raise TailleError(f"--beta {self.beta}: must be strictly between 0 and 1")
        if self.temperature <= 0:
            raise TailleError(f"--temperature {self.temperature}: must be positive")
        if self.ce_weight < 0 or self.kd_weight < 0 or self.ce_weight + self.kd_weight == 0:
            raise TailleError("--ce-weight and --kd-weight must be non-negative and not both 0")


def divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, kind: str = "fkl",
               beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence (N,) between logits (N, V) of the teacher and the student, in fp32."""
    t_logp = F.log_softmax(teacher_logits.float(), dim=-1)
    s_logp = F.log_softmax(student_logits.float(), dim=-1)
    if kind == "fkl":
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if kind == "rkl":
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    # log m = log(beta * p + (1 - beta) * q), stably
    m_logp = torch.logsumexp(torch.stack([t_logp + torch.log(torch.tensor(beta)), s_logp + torch.log(torch.tensor(1 - beta))]), dim=0)
    kl_pm = (t_logp.exp() * (t_logp - m_logp)).sum(-1)
    kl_qm = (s_logp.exp() * (s_logp - m_logp)).sum(-1)
    return beta * kl_pm + (1 - beta) * kl_qm


def topk_forward_kl(top_logp: torch.Tensor, top_idx: torch.Tensor, rest_logp: torch.Tensor,
                    student_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL (N,) against a cached teacher: its top-K log-probs (N, K) at token ids (N, K) and the
    log of the probability mass left outside them (N,). The student's distribution is folded the same
    way (its mass at the K ids, and the rest), so with K = V this is the exact forward KL."""
    s_logp = F.log_softmax(student_logits.float(), dim=-1)  # (N, V)
    s_top = s_logp.gather(-1, top_idx.long())  # (N, K)
    s_rest = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6))  # (N,)
    top_p = top_logp.float().exp()
    kl = (top_p * (top_logp.float() - s_top)).sum(-1)
    rest_p = rest_logp.float().exp()
    return kl + torch.where(rest_p > 0, rest_p * (rest_logp.float() - s_rest), torch.zeros_like(rest_p))


def _slice_loss(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, targets, mask,
                cfg: LossConfig, softcap, teacher_softcap, top):
    """Loss sum over one slice of tokens. The teacher's logits are built here, without gradient, so
    checkpointing keeps only the slice's hidden states, never its logits."""
    logits = student_hidden @ student_head_weight.T  # (N, V)
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    total = logits.new_zeros(())
    if cfg.kd_weight:
        if top is not None:
            kd = topk_forward_kl(*top, logits / cfg.temperature)
        else:
            with torch.no_grad():
                teacher_logits = (teacher_hidden @ teacher_head_weight.T).float()  # (N, V')
                if teacher_softcap:
                    teacher_logits = torch.tanh(teacher_logits / teacher_softcap) * teacher_softcap
            kd = divergence(teacher_logits[:, : logits.shape[-1]] / cfg.temperature, logits / cfg.temperature,
                            cfg.kind, cfg.beta)
        total = total + cfg.kd_weight * cfg.temperature**2 * (kd * mask).sum()
    if cfg.ce_weight:
        ce = F.cross_entropy(logits, targets, reduction="none")
        total = total + cfg.ce_weight * (ce * mask).sum()
    return total


def distill_loss(student_hidden: torch.Tensor, student_head: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor, cfg: LossConfig, teacher_hidden: torch.Tensor | None = None,
                 teacher_head: torch.Tensor | None = None, teacher_top=None, softcap: float | None = None,
                 teacher_softcap: float | None = None, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss summed over real tokens, number of real tokens).

    student_hidden (N, H) final hidden states at the positions that predict `targets` (N,); mask (N,) is
    1 for real tokens. The teacher is either hidden states (N, Ht) with its head weight (V', Ht), or a
    cached top-K triple (log-probs (N, K), ids (N, K), rest log-mass (N,)).
    """
    V = student_head.shape[0]
    chunk = chunk or max(1, LOGIT_ELEMENTS // V)
    mask = mask.float()
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, student_hidden.shape[0], chunk):
        s = slice(i, i + chunk)
        top = tuple(t[s] for t in teacher_top) if teacher_top is not None else None
        t_hidden = teacher_hidden[s] if teacher_hidden is not None else None
        args = (student_hidden[s], student_head, t_hidden, teacher_head, targets[s], mask[s], cfg, softcap,
                teacher_softcap, top)
        if torch.is_grad_enabled() and student_hidden.requires_grad:
            total = total + checkpoint(_slice_loss, *args, use_reentrant=False)
        else:
            total = total + _slice_loss(*args)
    return total, mask.sum()
