"""The sampled teacher cache (`teacher-cache --sampling random`, Sparse Logit Sampling): its stored
frequencies estimate the teacher's distribution without bias, so the student's gradient is unbiased where a
top-K cache's is not; the CLI builds it reproducibly, distillation reads it, and cutting one is refused."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taille.distill.cache import EMPTY_LOGP, open_cache, sampled_frequencies
from taille.distill.losses import log_mass_outside, topk_forward_kl
from tests.conftest import run_cli
from tests.distill.test_train import args, make_setup, metrics

V, DRAWS, ROWS = 40, 8, 6000


def teacher_logp() -> torch.Tensor:
    """A skewed distribution (V,) with a long tail: a few ids hold most of the mass."""
    return F.log_softmax(torch.linspace(4.0, -3.0, V) + 0.3 * torch.randn(V, generator=torch.Generator().manual_seed(0)), -1)


def gradient(top_logp, top_idx, rest_logp, logits):
    """d/dlogits of the cached forward KL (the loss distillation takes), by autograd."""
    z = logits.clone().requires_grad_(True)
    topk_forward_kl(top_logp, top_idx, rest_logp, z).sum().backward()
    return z.grad


def test_frequencies_are_an_unbiased_estimate_of_the_teacher():
    logp = teacher_logp().expand(ROWS, V)
    freq, idx = sampled_frequencies(logp, DRAWS, torch.Generator().manual_seed(1))
    assert freq.shape == idx.shape == (ROWS, DRAWS)
    assert all(len(set(row)) == DRAWS for row in idx[:50].tolist())  # distinct ids in every row
    assert torch.allclose(freq.exp().sum(-1), torch.ones(ROWS))  # the draws hold all the mass
    assert ((freq.exp() * DRAWS).round() - freq.exp() * DRAWS).abs().max() < 1e-4  # counts / DRAWS
    # undrawn ids fill a row by the teacher's probability, and a near-certain id counts every draw exactly
    sure = torch.full((V,), -30.0)
    sure[3] = 0.0
    f, i = sampled_frequencies(F.log_softmax(sure, -1)[None], DRAWS)
    assert i[0, 0] == 3 and f[0, 0].exp() == 1 and (f[0, 1:] == EMPTY_LOGP).all()
    estimate = torch.zeros(ROWS, V).scatter_add_(-1, idx, freq.exp()).mean(0)
    p = logp[0].exp()
    se = (p * (1 - p) / (DRAWS * ROWS)).sqrt()
    assert ((estimate - p).abs() <= 4 * se + 1e-6).all()


def test_the_sampled_gradient_is_unbiased_and_the_top_k_one_is_not():
    logp = teacher_logp()
    logits = torch.randn(V, generator=torch.Generator().manual_seed(2))
    true = F.softmax(logits, -1) - logp.exp()  # the full forward KL's gradient
    freq, idx = sampled_frequencies(logp.expand(ROWS, V), DRAWS, torch.Generator().manual_seed(3))
    sampled = gradient(freq, idx, torch.full((ROWS,), EMPTY_LOGP), logits.expand(ROWS, V)).mean(0)
    top_p, top_i = logp.topk(DRAWS)
    top = gradient(top_p[None], top_i[None], log_mass_outside(logp[None], top_i[None]), logits[None])[0]
    sampled_error, top_error = (sampled - true).abs().max(), (top - true).abs().max()
    assert sampled_error < 0.01 and top_error > 5 * sampled_error
    # each single draw's gradient is exactly softmax - the empirical distribution (no mass outside)
    one = gradient(freq[:1], idx[:1], torch.full((1,), EMPTY_LOGP), logits[None])[0]
    empirical = torch.zeros(V).scatter_add_(0, idx[0], freq[0].exp())
    assert torch.allclose(one, F.softmax(logits, -1) - empirical, atol=1e-6)


@pytest.fixture
def setup(tmp_path):
    """A confident teacher (its head scaled up: a random tiny model's distribution is near uniform, where
    draws from it and draws from anything else look alike)."""
    from safetensors.torch import load_file, save_file

    teacher, student, data, held = make_setup(tmp_path, tied=False)
    (weights,) = teacher.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["lm_head.weight"] *= 25
    save_file(tensors, weights, metadata={"format": "pt"})
    return teacher, student, data, held


def test_a_sampled_cache_is_reproducible_trains_a_student_and_cannot_be_cut(setup, tmp_path, capsys):
    teacher, student, data, held = setup
    for name, seed in (("s1", 5), ("s2", 5), ("s3", 6)):
        out, _ = run_cli(capsys, "teacher-cache", "--teacher", teacher, "--data", data, "--out", tmp_path / name,
                         "--top-k", 16, "--seq-len", 32, "--precision", "fp32", "--sampling", "random", "--seed", seed)
    assert "16 draws" in out
    meta = json.loads((tmp_path / "s1" / "meta.json").read_text())
    assert meta["sampling"] == "random" and meta["seed"] == 5
    a, b, c = (open_cache(tmp_path / name) for name in ("s1", "s2", "s3"))
    assert np.array_equal(a.top_idx, b.top_idx) and np.array_equal(a.top_logp, b.top_logp)
    assert not np.array_equal(a.top_logp, c.top_logp)  # another seed, other draws
    logp, idx, rest = a.batch([0, 1], "cpu")
    assert torch.allclose(logp.exp().sum(-1), torch.ones(len(logp)), atol=1e-3) and (rest.exp() == 0).all()
    # drawn from the teacher: the frequency of its most likely id is about its probability
    from taille.models.load import load_model

    t, tokenizer = load_model(teacher, device="cpu")
    with torch.no_grad():
        p = F.softmax(t(torch.from_numpy(np.asarray(a.blocks[:2], dtype=np.int64))).logits[:, :-1].float(), -1)
    p_max, top = p.reshape(-1, p.shape[-1]).max(-1)  # (2 * 31,)
    freq_top = torch.where(idx == top[:, None], logp.exp(), torch.zeros_like(logp)).sum(-1)
    assert p_max.mean() > 0.3 and (freq_top.mean() - p_max.mean()).abs() < 0.1

    argv = args(teacher, student, data, held, tmp_path / "kd", **{"--tokens": 4096, "--eval-every": 100})
    argv[argv.index("--teacher"):argv.index("--teacher") + 2] = ["--teacher-cache", str(tmp_path / "s1")]
    del argv[argv.index("--data"):argv.index("--data") + 2]
    run_cli(capsys, *argv)
    assert all(np.isfinite([r["loss"] for r in metrics(tmp_path / "kd") if "loss" in r]))
    # trained on 16 draws a position, the student comes closer to the teacher's whole distribution
    from taille.models.lm import token_kl

    ids = tokenizer(data.read_text()[:400], return_tensors="pt")["input_ids"][:, :64]
    with torch.no_grad():
        before, after = (token_kl(t, load_model(s, device="cpu")[0], ids).mean() for s in (student, tmp_path / "kd"))
    assert after < 0.6 * before  # measured: 3.80 -> 2.02

    _, err = run_cli(capsys, "teacher-cache", "--from", tmp_path / "s1", "--top-k", 8, "--out", tmp_path / "cut", code=2)
    assert "a sampled cache's first columns are not a smaller sample" in err and not (tmp_path / "cut").exists()
    _, err = run_cli(capsys, "teacher-cache", "--teacher", teacher, "--data", data, "--out", tmp_path / "x",
                     "--sampling", "nucleus", code=2)
    assert "--sampling nucleus: one of top, random" in err
