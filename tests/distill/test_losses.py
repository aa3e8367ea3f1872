import pytest
import torch
import torch.nn.functional as F

from taille.distill.losses import LossConfig, distill_loss, divergence, topk_forward_kl

g = torch.Generator().manual_seed(0)
N, H, V = 37, 16, 50
TEACHER_H, STUDENT_H = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
TEACHER_W, STUDENT_W = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
TARGETS = torch.randint(0, V, (N,), generator=g)


def test_forward_kl_equals_kl_div():
    t, s = TEACHER_H @ TEACHER_W.T, STUDENT_H @ STUDENT_W.T
    reference = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(divergence(t, s, "fkl"), reference)
    reverse = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(divergence(t, s, "rkl"), reverse)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_zero_when_student_equals_teacher(kind):
    logits = TEACHER_H @ TEACHER_W.T
    assert divergence(logits, logits.clone(), kind).abs().max() < 1e-6


def test_jsd_limits_match_the_kls():
    t, s = 0.25 * TEACHER_H @ TEACHER_W.T, 0.25 * STUDENT_H @ STUDENT_W.T
    beta = 1e-3  # JSD_beta / beta -> KL(p || q) as beta -> 0, and JSD_beta / (1 - beta) -> KL(q || p) as beta -> 1
    torch.testing.assert_close(divergence(t, s, "jsd", beta) / beta, divergence(t, s, "fkl"), rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(divergence(t, s, "jsd", 1 - beta) / beta, divergence(t, s, "rkl"), rtol=2e-2, atol=1e-4)
    # and at beta = 1/2 it is the symmetric Jensen-Shannon divergence
    p, q = t.softmax(-1), s.softmax(-1)
    m = (p + q) / 2
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(divergence(t, s, "jsd", 0.5), js)


@pytest.mark.parametrize("cfg", [LossConfig(), LossConfig("rkl"), LossConfig("jsd", beta=0.3),
                                 LossConfig(ce_weight=0.5, temperature=2.0)])
def test_chunked_equals_unchunked_with_gradients(cfg):
    mask = (torch.arange(N) % 5 != 0).float()
    grads = []
    for chunk in (N, 7, 1):
        s_h = STUDENT_H.clone().requires_grad_()
        w = STUDENT_W.clone().requires_grad_()
        loss, n = distill_loss(s_h, w, TARGETS, mask, cfg, TEACHER_H, TEACHER_W, chunk=chunk)
        loss.backward()
        grads.append((loss.detach(), n, s_h.grad, w.grad))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32 sums in another order
    assert grads[0][1] == mask.sum()


def test_unchunked_matches_a_direct_formula():
    cfg = LossConfig(ce_weight=0.25)
    mask = torch.ones(N)
    loss, n = distill_loss(STUDENT_H, STUDENT_W, TARGETS, mask, cfg, TEACHER_H, TEACHER_W)
    t, s = TEACHER_H @ TEACHER_W.T, STUDENT_H @ STUDENT_W.T
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    expected = expected + 0.25 * F.cross_entropy(s, TARGETS, reduction="sum")
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("cfg", [LossConfig(ce_weight=0.25), LossConfig("rkl"), LossConfig("jsd", beta=0.3),
                                 LossConfig("rkl", ce_weight=0.5, kd_weight=2.0), LossConfig("jsd", beta=0.8, ce_weight=0.5),
                                 LossConfig("rkl", temperature=2.0), LossConfig("jsd", temperature=2.0),
                                 LossConfig(ce_weight=1.0, kd_weight=0.0), LossConfig(temperature=2.0),
                                 LossConfig(ce_weight=0.5, temperature=2.0)],
                         ids=["fkl+ce", "rkl", "jsd", "rkl+ce", "jsd+ce", "rkl-T2", "jsd-T2", "ce", "fkl-T2", "fkl+ce-T2"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_gradients_taken_in_the_forward_pass_equal_autograd_on_full_logits(cfg, softcap):
    """The sliced head loss computes its gradients while each slice's logits exist; they must be the
    gradients of the plain formula on the whole (N, V) logits, for the hidden states and the head."""
    mask = (torch.arange(N) % 4 != 0).float()
    s_h, w = STUDENT_H.clone().requires_grad_(), STUDENT_W.clone().requires_grad_()
    loss, _ = distill_loss(s_h, w, TARGETS, mask, cfg, TEACHER_H, TEACHER_W, softcap=softcap, teacher_softcap=softcap,
                           chunk=6)
    (2.5 * loss).backward()  # an upstream scale reaches both gradients
    r_h, r_w = STUDENT_H.clone().requires_grad_(), STUDENT_W.clone().requires_grad_()
    s, t = r_h @ r_w.T, TEACHER_H @ TEACHER_W.T
    if softcap:
        s, t = torch.tanh(s / softcap) * softcap, torch.tanh(t / softcap) * softcap
    T = cfg.temperature
    per_token = cfg.kd * T * T * divergence(t / T, s / T, cfg.kind, cfg.beta) + cfg.ce_weight * F.cross_entropy(
        s, TARGETS, reduction="none")
    reference = (per_token * mask).sum()
    (2.5 * reference).backward()
    torch.testing.assert_close(loss, reference.detach())
    torch.testing.assert_close(s_h.grad, r_h.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, r_w.grad, rtol=1e-4, atol=1e-5)


def test_sliced_loss_under_bf16_autocast_keeps_input_dtypes():
    s_h, w = STUDENT_H.clone().requires_grad_(), STUDENT_W.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = distill_loss(s_h, w, TARGETS, torch.ones(N), LossConfig(), TEACHER_H, TEACHER_W, chunk=8)
    loss.backward()
    assert loss.dtype == s_h.grad.dtype == w.grad.dtype == torch.float32
    reference, _ = distill_loss(STUDENT_H, STUDENT_W, TARGETS, torch.ones(N), LossConfig(), TEACHER_H, TEACHER_W)
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=0.5)  # bf16 logits: same value, coarser


def test_topk_cache_with_k_equal_vocab_is_the_full_loss():
    t, s = TEACHER_H @ TEACHER_W.T, STUDENT_H @ STUDENT_W.T
    t_logp = F.log_softmax(t, -1)
    top_logp, top_idx = t_logp.topk(V, dim=-1)
    rest = torch.full((N,), float("-inf"))
    torch.testing.assert_close(topk_forward_kl(top_logp, top_idx, rest, s), divergence(t, s, "fkl"), rtol=1e-4, atol=1e-5)
    cfg, mask = LossConfig(), torch.ones(N)
    full, _ = distill_loss(STUDENT_H, STUDENT_W, TARGETS, mask, cfg, TEACHER_H, TEACHER_W)
    cached, _ = distill_loss(STUDENT_H, STUDENT_W, TARGETS, mask, cfg, teacher_top=(top_logp, top_idx, rest))
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_topk_cache_with_small_k_is_close_and_nonnegative():
    t, s = TEACHER_H @ TEACHER_W.T, STUDENT_H @ STUDENT_W.T
    t_logp = F.log_softmax(t, -1)
    top_logp, top_idx = t_logp.topk(10, dim=-1)
    rest = torch.log1p(-top_logp.exp().sum(-1))
    folded = topk_forward_kl(top_logp, top_idx, rest, s)
    assert (folded >= -1e-6).all() and (folded <= divergence(t, s, "fkl") + 1e-5).all()  # folding never adds KL


def test_topk_cache_loss_is_exact_when_the_student_puts_nearly_all_its_mass_on_the_k_ids():
    # a trained student often leaves ~1e-9 outside the teacher's top K; 1 - kept mass cancels to 0 in fp32 there,
    # and the loss and its gradient went wrong (clamped, then 1e6 times too steep near the clamp)
    K = 8
    t = torch.randn(N, V, generator=g)
    top_logp, top_idx = F.log_softmax(t, -1).topk(K, dim=-1)
    rest = torch.log1p(-top_logp.double().exp().sum(-1)).float()  # the teacher leaves real mass outside
    s = torch.randn(N, V, generator=g)
    s.scatter_add_(-1, top_idx, torch.full((N, K), 25.0))  # the student keeps ~1e-9 outside its top K
    s64 = s.double().requires_grad_()
    s_logp = F.log_softmax(s64, -1)
    kept = s_logp.gather(-1, top_idx)
    outside = torch.log(s_logp.exp().sum(-1) - kept.exp().sum(-1))  # exact enough in fp64 at 1e-9
    assert (outside.exp() < 1e-7).all()
    p_top, p_rest = top_logp.double().exp(), rest.double().exp()
    reference = (p_top * (top_logp.double() - kept)).sum(-1) + p_rest * (rest.double() - outside)
    reference.sum().backward()
    s32 = s.clone().requires_grad_()
    folded = topk_forward_kl(top_logp, top_idx, rest, s32)
    folded.sum().backward()
    torch.testing.assert_close(folded.double(), reference.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-3, atol=1e-4)


def test_topk_cache_loss_gradient_stays_finite_when_the_k_ids_cover_the_vocabulary():
    t, s = TEACHER_H @ TEACHER_W.T, (STUDENT_H @ STUDENT_W.T).requires_grad_()
    top_logp, top_idx = F.log_softmax(t, -1).topk(V, dim=-1)
    topk_forward_kl(top_logp, top_idx, torch.full((N,), float("-inf")), s).sum().backward()
    reference = s.detach().clone().requires_grad_()
    divergence(t, reference, "fkl").sum().backward()
    torch.testing.assert_close(s.grad, reference.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("K", [1, 10, V])
@pytest.mark.parametrize("cfg", [LossConfig(), LossConfig(ce_weight=0.25), LossConfig(temperature=2.0)],
                         ids=["fkl", "fkl+ce", "fkl-T2"])
def test_topk_cache_gradients_taken_in_the_forward_pass_equal_autograd(K, cfg):
    # the sliced head loss writes the folded KL's gradient out (no autograd over (n, V)); it must equal autograd of
    # topk_forward_kl on the whole logits, also where the student leaves ~1e-9 outside the K ids
    mask = (torch.arange(N) % 4 != 0).float()
    w = STUDENT_W.clone()
    t = TEACHER_H @ TEACHER_W.T
    top_logp, top_idx = F.log_softmax(t / cfg.temperature, -1).topk(K, dim=-1)
    rest = torch.log1p(-top_logp.double().exp().sum(-1)).float() if K < V else torch.full((N,), float("-inf"))
    w[top_idx[0, 0]] += 3.0 * STUDENT_H[0] / STUDENT_H[0].norm() ** 2 * 8  # row 0: one id takes nearly all the mass
    s_h, s_w = STUDENT_H.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = distill_loss(s_h, s_w, TARGETS, mask, cfg, teacher_top=(top_logp, top_idx, rest), chunk=6)
    (2.5 * loss).backward()
    r_h, r_w = STUDENT_H.clone().requires_grad_(), w.clone().requires_grad_()
    s = r_h @ r_w.T
    T = cfg.temperature
    per_token = cfg.kd * T * T * topk_forward_kl(top_logp, top_idx, rest, s / T) + cfg.ce_weight * F.cross_entropy(
        s, TARGETS, reduction="none")
    reference = (per_token * mask).sum()
    (2.5 * reference).backward()
    assert torch.isfinite(s_h.grad).all() and torch.isfinite(s_w.grad).all()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s_h.grad, r_h.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_w.grad, r_w.grad, rtol=1e-4, atol=1e-5)
