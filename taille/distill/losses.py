"""Distillation losses on logits, computed in slices of tokens.

A (B, T, V) logits tensor at V = 131k-256k does not fit next to a model, so losses take final hidden
states and the heads, and apply the heads `chunk` tokens at a time. The gradient of each slice is taken
while its logits exist (in the forward pass, see _HeadLoss), so memory holds one slice of logits at a
time and no head matmul runs twice.

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

import math

import torch
import torch.nn.functional as F

from taille.distill.config import LossConfig
from taille.errors import TailleError

KINDS = ("fkl", "rkl", "jsd")
LOGIT_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}
"""Logit values per slice, by device (64 MiB in fp32 on a CPU, where slices that stay in cache are
fastest; 512 MiB on a GPU, where small slices leave it waiting on kernel launches): the chunk is this
divided by the vocabulary."""


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


def log_mass_outside(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass (N,) outside the ids idx (N, K) of log-probs logp (N, V), summed over the
    other ids in log space. Not log(1 - kept mass): that cancels once the K ids hold all but ~1e-7 of the
    mass (fp32), and its gradient 1 / (1 - kept) then blows up. A row with no id left gets the dtype's most negative
    finite value, not -inf, so that its gradient stays 0 rather than NaN."""
    return logp.scatter(-1, idx.long(), torch.finfo(logp.dtype).min).logsumexp(-1)


def topk_forward_kl(top_logp: torch.Tensor, top_idx: torch.Tensor, rest_logp: torch.Tensor,
                    student_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL (N,) against a cached teacher: its top-K log-probs (N, K) at token ids (N, K) and the
    log of the probability mass left outside them (N,). The student's distribution is folded the same
    way (its mass at the K ids, and the rest), so with K = V this is the exact forward KL."""
    s_logp = F.log_softmax(student_logits.float(), dim=-1)  # (N, V)
    s_top = s_logp.gather(-1, top_idx.long())  # (N, K)
    s_rest = log_mass_outside(s_logp, top_idx)  # (N,)
    top_p = top_logp.float().exp()
    kl = (top_p * (top_logp.float() - s_top)).sum(-1)
    rest_p = rest_logp.float().exp()
    return kl + torch.where(rest_p > 0, rest_p * (rest_logp.float() - s_rest), torch.zeros_like(rest_p))


def _objective(cfg: LossConfig, targets, mask, teacher_hidden, teacher_head_weight, top, softcap, teacher_softcap):
    """loss(logits (n, V) of rows `rows`) -> the weighted loss summed over those rows, in fp32. The
    teacher's logits for the same rows are built inside, without gradient, one slice at a time."""

    def loss(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        logits = logits.float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        m = mask[rows]
        total = logits.new_zeros(())
        if cfg.kd:
            if top is not None:
                kd = topk_forward_kl(*(t[rows] for t in top), logits / cfg.temperature)
            else:
                with torch.no_grad():
                    teacher_logits = (teacher_hidden[rows] @ teacher_head_weight.T).float()  # (n, V')
                    if teacher_softcap:
                        teacher_logits = torch.tanh(teacher_logits / teacher_softcap) * teacher_softcap
                kd = divergence(teacher_logits[:, : logits.shape[-1]] / cfg.temperature, logits / cfg.temperature,
                                cfg.kind, cfg.beta)
            total = total + cfg.kd * cfg.temperature**2 * (kd * m).sum()
        if cfg.ce_weight:
            ce = F.cross_entropy(logits, targets[rows], reduction="none")
            total = total + cfg.ce_weight * (ce * m).sum()
        return total

    return loss


def _topk_kl_value_and_grad(s_logp: torch.Tensor, q: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor,
                            rest_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_forward_kl` (n,) and its gradient w.r.t. the (tempered) logits (n, V), written into q = exp(s_logp)
    (n, V), which it overwrites. With p the cached teacher (P = its top-K mass + p_rest, 1 up to fp16 rounding)
    and q_rest the student's mass outside the K ids: d/dz = q P - p at the K ids, q (P - p_rest / q_rest)
    elsewhere. q_rest is summed over the other ids (their entries of q zeroed for the sum and put back),
    never 1 - kept, which cancels."""
    idx = top_idx.long()
    top_p, rest_p = top_logp.float().exp(), rest_logp.float().exp()  # (n, K), (n,)
    s_top, q_top = s_logp.gather(-1, idx), q.gather(-1, idx)  # (n, K)
    q_rest = q.scatter_(-1, idx, 0.0).sum(-1)  # (n,)
    has_rest = rest_p > 0
    safe_rest = q_rest.clamp(min=torch.finfo(q.dtype).tiny)
    kl = (top_p * (top_logp.float() - s_top)).sum(-1) + torch.where(
        has_rest, rest_p * (rest_logp.float() - safe_rest.log()), torch.zeros_like(rest_p))
    P = top_p.sum(-1) + rest_p  # (n,)
    grad = q.mul_((P - torch.where(has_rest, rest_p / safe_rest, torch.zeros_like(rest_p)))[:, None])
    return kl, grad.scatter_(-1, idx, q_top * P[:, None] - top_p)


def _fused_value_and_grad(cfg: LossConfig, targets, mask, teacher_hidden, teacher_head_weight, top=None):
    """The same loss as `_objective` (+ CE at T = 1), with its gradient w.r.t. the logits z written out and
    computed in place: about half the passes over the (n, V) slice that autograd needs, which is where a CPU
    step spends its time. With p the teacher, q = softmax(z) the student and T the temperature:
      fkl  (q - p) T; with `top` (a cached top-K teacher) the folded KL of `topk_forward_kl`
      rkl  q (l - KL(q || p)) T, with l = log q - log p
      jsd  (1 - beta) q (l - KL(q || m)) T, with l = log q - log m: d JSD / d q_j = (1 - beta) log(q_j / m_j),
           since beta p_j + (1 - beta) q_j = m_j cancels the other terms, then through the softmax
      ce   q - onehot(target)."""
    T = cfg.temperature

    def value_and_grad(logits: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask[rows]
        s_logp = F.log_softmax(logits.float() / T if T != 1 else logits.float(), dim=-1)  # (n, V)
        value = logits.new_zeros((), dtype=torch.float32)
        if cfg.ce_weight:
            picked = s_logp.gather(-1, targets[rows, None]).squeeze(-1)  # (n,)
            value = value - cfg.ce_weight * (picked * m).sum()
        q = s_logp.exp()  # (n, V)
        grad = q * (cfg.ce_weight * m)[:, None] if cfg.ce_weight else None
        if cfg.ce_weight:
            grad.scatter_add_(-1, targets[rows, None], -(cfg.ce_weight * m)[:, None])
        if cfg.kd and top is not None:
            kl, kd_grad = _topk_kl_value_and_grad(s_logp, q, *(t[rows] for t in top))  # (n,), (n, V)
        elif cfg.kd:
            t = (teacher_hidden[rows] @ teacher_head_weight.T).float()[:, : logits.shape[-1]]  # (n, V)
            t_logp = F.log_softmax(t / T if T != 1 else t, dim=-1)
            if cfg.kind == "fkl":
                p_t = t_logp.exp()
                kl = (p_t * t_logp.sub_(s_logp)).sum(-1)  # (n,)
                kd_grad = q.sub_(p_t)
            elif cfg.kind == "rkl":
                l = s_logp.sub_(t_logp)  # log q - log p, in s_logp's place
                kl = (q * l).sum(-1)
                kd_grad = q.mul_(l.sub_(kl[:, None]))
            else:  # jsd
                beta = cfg.beta
                m_logp = torch.logaddexp(t_logp + math.log(beta), s_logp + math.log1p(-beta))  # log m
                p_t = t_logp.exp()
                kl_pm = (p_t * t_logp.sub_(m_logp)).sum(-1)
                l = s_logp.sub_(m_logp)  # log q - log m
                kl_qm = (q * l).sum(-1)
                kl = beta * kl_pm + (1 - beta) * kl_qm
                kd_grad = q.mul_(l.sub_(kl_qm[:, None])).mul_(1 - beta)
        if cfg.kd:
            value = value + cfg.kd * T * T * (kl * m).sum()
            kd_grad = kd_grad.mul_((cfg.kd * T * m)[:, None])
            grad = kd_grad if grad is None else grad.add_(kd_grad)
        return value, grad

    return value_and_grad


class _HeadLoss(torch.autograd.Function):
    """sum over slices of rows of loss(hidden[rows] @ weight.T), with the gradients for `hidden` and
    `weight` worked out in the forward pass, slice by slice, while each slice's logits exist: backward
    only scales them. So no (N, V) logits are ever held, and none is computed twice (activation
    checkpointing of the slices would run both heads' matmuls again in backward). Autocast applies to
    the matmuls as to any others; gradients are returned in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, hidden, weight, loss, chunk, value_and_grad=None):
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk):
            rows = slice(i, i + chunk)
            h = hidden[rows]  # (n, H)
            if value_and_grad is not None:
                with torch.no_grad():
                    value, g = value_and_grad(h @ weight.T, rows)  # g (n, V): d loss / d logits, fp32
                g = g.to(torch.promote_types(h.dtype, weight.dtype) if not torch.is_autocast_enabled(h.device.type)
                         else torch.get_autocast_dtype(h.device.type))
            else:
                with torch.enable_grad():
                    logits = (h @ weight.T).detach().requires_grad_()  # (n, V)
                    value = loss(logits, rows)
                (g,) = torch.autograd.grad(value, logits)  # (n, V): d loss / d logits
            if grad_hidden is not None:
                grad_hidden[rows] = g @ weight.to(g.dtype)
            if grad_weight is not None:
                grad_weight += g.T @ h.to(g.dtype)
            total += value.detach()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


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
    chunk = chunk or max(1, LOGIT_ELEMENTS.get(student_hidden.device.type, LOGIT_ELEMENTS["cpu"]) // V)
    mask = mask.float()
    loss = _objective(cfg, targets, mask, teacher_hidden, teacher_head, teacher_top, softcap, teacher_softcap)
    if torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad):
        fast = None
        if not softcap and not teacher_softcap and (cfg.temperature == 1 or not cfg.ce_weight) and (
                teacher_hidden is not None or (teacher_top is not None and cfg.kind == "fkl") or not cfg.kd):
            fast = _fused_value_and_grad(cfg, targets, mask, teacher_hidden, teacher_head, teacher_top)
        return _HeadLoss.apply(student_hidden, student_head, loss, chunk, fast), mask.sum()
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, student_hidden.shape[0], chunk):
        total = total + loss(student_hidden[i:i + chunk] @ student_head.T, slice(i, i + chunk))
    return total, mask.sum()
