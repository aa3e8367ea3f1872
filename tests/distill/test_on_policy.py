"""On-policy distillation (--on-policy): the student's sampled tails are real draws from it, the teacher grades
exactly those tokens, the choice of blocks and draws is the same on any number of processes, bad settings
are refused."""

import numpy as np
import pytest
import torch

from tests.conftest import run_cli, save_tiny
from tests.distill.test_train import args, make_setup


def tiny(tmp_path, family="llama", seed=3):
    """A tiny model of `family`; a family with sliding-window attention gets a window of 4 tokens, so the
    KV cache's sliding layers are exercised by 10-token prompts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = save_tiny(tmp_path / "m", family, seed=seed)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "sliding_window", None):
        config.sliding_window = 4
    return AutoModelForCausalLM.from_pretrained(path, config=config).eval()


def generators(seeds):
    out = []
    for s in seeds:
        g = torch.Generator()
        g.manual_seed(s)
        out.append(g)
    return out


def test_a_sampled_tail_equals_sampling_without_the_kv_cache_row_by_row(tmp_path, family):
    """The KV-cache loop against the whole model's logits recomputed from scratch at every token, with the
    same uniform draws, in every family (sliding windows included); and a row sampled alone gives the tokens
    it gets inside a batch."""
    from taille.distill.onpolicy import sample_tail

    model = tiny(tmp_path, family)
    prefix = torch.randint(0, 200, (3, 10))
    tails = sample_tail(model, prefix, 6, generators([11, 12, 13]))
    assert tails.shape == (3, 6)
    expected = []
    for row, g in zip(prefix, generators([11, 12, 13])):
        seq = row[None]
        for _ in range(6):
            with torch.no_grad():
                logits = model(seq).logits[0, -1].float()  # (V,)
            u = torch.rand((), generator=g, dtype=torch.float64)
            probs = torch.softmax(logits.double(), dim=-1)
            token = int((probs.cumsum(0) < u * probs.sum()).sum())  # the first id whose cumulative mass reaches u
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
        expected.append(seq[0, 10:])
    assert torch.equal(tails, torch.stack(expected))
    assert torch.equal(sample_tail(model, prefix[1:2], 6, generators([12])), tails[1:2])


def test_the_draws_follow_the_students_softmax(tmp_path):
    """4,000 first tokens after one prompt: each likely token's frequency is within 4 standard errors of the
    model's probability (a sharpened head, so a few tokens carry most of the mass)."""
    from taille.distill.onpolicy import sample_tail

    model = tiny(tmp_path)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
        prompt = torch.randint(0, 200, (1, 8))
        probs = torch.softmax(model(prompt).logits[0, -1].float(), dim=-1)  # (V,)
    n = 4000
    draws = sample_tail(model, prompt.expand(n, -1), 1, generators(range(n)))[:, 0]
    counts = torch.bincount(draws, minlength=probs.shape[0]).double() / n
    top = probs.topk(5).indices
    assert probs[top].sum() > 0.5
    se = (probs[top] * (1 - probs[top]) / n).sqrt()
    assert ((counts[top] - probs[top].double()).abs() < 4 * se + 1e-3).all(), (counts[top], probs[top])


def test_on_policy_places_are_spread_evenly_whatever_the_slicing():
    from taille.distill.onpolicy import on_policy_places

    assert on_policy_places(8, 0.5, 8).tolist() == [False, True] * 4
    quarter = on_policy_places(16, 0.25, 4)
    assert quarter.sum() == 4 and all(quarter[i:i + 4].sum() == 1 for i in range(0, 16, 4))
    # 3/8 of a global batch of 16 cut into two processes' slices of 8: 3 each; the same places when a resume
    # on 2 processes keeps the global batch (2 x 8) that one process ran as 1 x 16 (6/16)
    three = on_policy_places(16, 3 / 8, 8)
    assert three[:8].sum() == three[8:].sum() == 3
    assert (on_policy_places(16, 6 / 16, 16) == three).all()
    # a third of micro-batches of 3, as a user types it, over 8 micro-batches: one in each, never none
    assert (on_policy_places(24, 0.3333333, 3).reshape(8, 3).sum(1) == 1).all()
    assert on_policy_places(5, 1.0, 5).all()


def test_an_on_policy_step_grades_the_students_own_tails(tmp_path, monkeypatch):
    """Half of each micro-batch's blocks reach the teacher with their last tokens replaced by the student's
    samples (exactly those an independent call draws with the same generators), the rest as the data holds
    them; with activation checkpointing on (the sampling switches to eval mode for its KV cache)."""
    import taille.distill.train as train
    from taille.data.mixture import run_order
    from taille.distill.onpolicy import place_generators, sample_tail

    teacher, student, data, held = make_setup(tmp_path, tied=False)
    cfg = train.DistillConfig(student=str(student), teacher=str(teacher), data=str(data), eval_data=None,
                              out=str(tmp_path / "o"), tokens=1024, seq_len=32, batch_size=4, grad_accum=2,
                              precision="fp32", progress=False, on_policy=0.5, on_policy_tokens=8,
                              activation_checkpointing=True)
    run = train.setup(cfg)
    seen = []
    real = train._teacher_outputs
    monkeypatch.setattr(train, "_teacher_outputs", lambda run, ids, top=None: (seen.append(ids.clone()), real(run, ids, top))[1])
    step = 3
    before = {k: v.detach().clone() for k, v in run.student.state_dict().items()}
    train.train_step(run, step)
    order = run_order(run.blocks, cfg.seed, step * run.global_batch, run.global_batch)
    assert len(seen) == 2  # two micro-steps
    for micro, ids in enumerate(seen):
        places = micro * 4 + np.argsort(order[micro * 4:micro * 4 + 4], kind="stable")
        data_ids = torch.from_numpy(run.blocks[order[places]].astype(np.int64))
        assert torch.equal(ids[:, :24], data_ids[:, :24])  # every prompt is the data's
        on = places % 2 == 1  # the places a share of 2/4 marks
        assert torch.equal(ids[~on], data_ids[~on])
        assert not torch.equal(ids[on, 24:], data_ids[on, 24:])
        # the same draws from the student as it was before this step's update
        model = run.student
        updated = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(before)
        model.eval()
        tails = sample_tail(model, data_ids[on, :24], 8, place_generators(cfg.seed, step, places[on]))
        model.load_state_dict(updated)
        assert torch.equal(ids[on, 24:], tails)


@pytest.mark.parametrize("extra, message", [
    ({"--on-policy": 1.5}, "--on-policy 1.5: a share between 0 and 1"),
    ({"--on-policy": 0.3}, "give a whole number of blocks per micro-batch (1/4, 2/4, 3/4, 4/4, ...)"),
    ({"--on-policy": 1e-10}, "give a whole number of blocks per micro-batch"),
    ({"--on-policy": 0.5, "--on-policy-tokens": 32}, "--on-policy-tokens 32: between 1 and --seq-len - 1 (31)"),
    ({"--on-policy": 0.5, "--ce-weight": 0.5}, "the cross-entropy's targets would be the student's own samples"),
])
def test_bad_on_policy_settings_are_refused_in_one_line(tmp_path, capsys, extra, message):
    teacher, student, data, held = make_setup(tmp_path, tied=False)
    _, err = run_cli(capsys, *args(teacher, student, data, held, tmp_path / "o", **extra), code=2)
    assert message in err and "Traceback" not in err


def test_on_policy_without_a_live_teacher_is_refused(tmp_path, capsys):
    teacher, student, data, held = make_setup(tmp_path, tied=False)
    run_cli(capsys, "teacher-cache", "--teacher", teacher, "--data", data, "--out", tmp_path / "cache", "--top-k", 8,
            "--seq-len", 32, "--precision", "fp32")
    _, err = run_cli(capsys, "distill", "--student", student, "--teacher-cache", tmp_path / "cache", "--out",
                     tmp_path / "o", "--seq-len", 32, "--batch-size", 4, "--on-policy", 0.5, code=2)
    assert "--on-policy needs a live --teacher" in err


def test_a_replys_start_is_found_within_the_tail_and_nowhere_else():
    """The first position within the last `tokens` that follows the marker; a marker ending before the tail,
    or the block's last token being a marker's end, is not a start; no marker: the fixed tail."""
    from taille.distill.onpolicy import tail_starts

    M = [7, 8, 9]
    T = 20
    rows = torch.zeros(5, T, dtype=torch.long)
    rows[0, 12:15] = torch.tensor(M)  # reply at 15, inside the last 8 (12..19)
    rows[0, 16:19] = torch.tensor(M)  # a second one later: the first wins
    rows[1, 8:11] = torch.tensor(M)  # reply at 11: before the tail
    rows[2, 10:13] = torch.tensor(M)  # reply at 13, its header straddling the tail's start
    rows[3, 17:20] = torch.tensor(M)  # a header ending the block: no reply token after it
    rows[4, 12:14] = torch.tensor(M[:2])  # an incomplete header
    assert tail_starts(rows, 8, M).tolist() == [15, 12, 13, 12, 12]
    assert tail_starts(rows, 8, None).tolist() == [12] * 5


def test_forced_tokens_stand_and_a_row_samples_as_it_would_alone(tmp_path):
    """Rows whose replies start at different places in one batch: the forced positions keep the data's
    tokens, and from its start each row draws exactly what it draws sampled alone from that start (its
    generator is used only where it samples)."""
    from taille.distill.onpolicy import sample_tail

    model = tiny(tmp_path)
    data = torch.randint(0, 200, (3, 16))
    prompt, starts = 10, [10, 13, 15]
    forced = data[:, prompt:].clone()
    for r, start in enumerate(starts):
        forced[r, start - prompt:] = -1
    tails = sample_tail(model, data[:, :prompt], 6, generators([21, 22, 23]), forced)
    for r, start in enumerate(starts):
        assert torch.equal(tails[r, :start - prompt], data[r, prompt:start])
        alone = sample_tail(model, data[r:r + 1, :start], 16 - start, generators([21 + r]))
        assert torch.equal(tails[r, start - prompt:], alone[0])


def test_an_on_policy_step_from_replies_samples_each_reply_from_its_start(tmp_path, monkeypatch):
    """--on-policy-from reply on chat data: in each on-policy block the data stands up to the first reply that
    starts within the tail (found here by a plain scan) and the student's own draws follow; blocks with no
    reply there are sampled over the whole tail."""
    import json

    import taille.distill.train as train
    from taille.data.mixture import run_order
    from taille.distill.onpolicy import place_generators, sample_tail

    teacher, student, _, _ = make_setup(tmp_path, tied=False)
    data = tmp_path / "chat.jsonl"
    turns = [("user", "Where the place?"), ("assistant", "Upon the heath."), ("user", "When shall we three meet?"),
             ("assistant", "When the battle is lost and won, in thunder.")]
    data.write_text("\n".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns[:k]]})
                              for k in (2, 4, 4, 2, 4) * 8))
    cfg = train.DistillConfig(student=str(student), teacher=str(teacher), data=str(data), eval_data=None,
                              out=str(tmp_path / "o"), tokens=2048, seq_len=64, batch_size=4, grad_accum=2,
                              precision="fp32", progress=False, on_policy=1.0, on_policy_tokens=24,
                              on_policy_from="reply")
    run = train.setup(cfg)
    marker = run.reply_marker
    assert run.tokenizer.decode(marker) == "<|assistant|>"
    seen = []
    real = train._teacher_outputs
    monkeypatch.setattr(train, "_teacher_outputs", lambda run, ids, top=None: (seen.append(ids.clone()), real(run, ids, top))[1])
    before = {k: v.detach().clone() for k, v in run.student.state_dict().items()}
    step = 1
    train.train_step(run, step)
    run.student.load_state_dict(before)
    run.student.eval()
    order = run_order(run.blocks, cfg.seed, step * run.global_batch, run.global_batch)
    found = 0
    for micro, ids in enumerate(seen):
        places = micro * 4 + np.argsort(order[micro * 4:micro * 4 + 4], kind="stable")
        data_ids = torch.from_numpy(run.blocks[order[places]].astype(np.int64))
        for r in range(4):
            row = data_ids[r].tolist()
            start = next((j + len(marker) for j in range(64 - len(marker)) if row[j:j + len(marker)] == marker
                          and 40 <= j + len(marker) <= 63), 40)
            found += start > 40
            assert torch.equal(ids[r, :start], data_ids[r, :start])
            alone = sample_tail(run.student, data_ids[r:r + 1, :start], 64 - start,
                                place_generators(cfg.seed, step, places[r:r + 1]))
            assert torch.equal(ids[r, start:], alone[0])
    assert found >= 2  # replies were found, not only fixed tails


def test_replies_need_a_chat_template_and_on_policy(tmp_path, capsys):
    from tests.conftest import save_tiny

    teacher, student, data, held = make_setup(tmp_path, tied=False)
    plain = save_tiny(tmp_path / "plain", "llama", seed=2, chat_template=None)
    _, err = run_cli(capsys, *args(teacher, plain, data, held, tmp_path / "o", **{"--on-policy": 0.5,
                                                                                   "--on-policy-tokens": 8,
                                                                                   "--on-policy-from": "reply"}), code=2)
    assert "--on-policy-from reply: the student's tokenizer has no chat template" in err and "Traceback" not in err
    _, err = run_cli(capsys, *args(teacher, student, data, held, tmp_path / "o", **{"--on-policy-from": "reply"}), code=2)
    assert "--on-policy-from reply needs --on-policy SHARE" in err
    _, err = run_cli(capsys, *args(teacher, student, data, held, tmp_path / "o", **{"--on-policy": 0.5,
                                                                                   "--on-policy-tokens": 8,
                                                                                   "--on-policy-from": "start"}), code=2)
    assert "--on-policy-from start: use one of end, reply" in err


def test_a_killed_on_policy_run_resumes_to_the_uninterrupted_curve(tmp_path):
    """The draws are a function of (seed, step, place): after a SIGKILL, --resume samples what the
    uninterrupted run sampled, and its losses are that run's."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import kill_when_exists

    setup = make_setup(tmp_path, tied=False)
    extra = {"--tokens": 1024, "--save-every": 4, "--on-policy": 0.5, "--on-policy-tokens": 8}
    env = {**os.environ, "TAILLE_LOG": "WARNING"}
    cmd = [sys.executable, "-m", "taille"]
    full = subprocess.run(cmd + args(*setup, tmp_path / "full", **extra), env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    kill_when_exists(cmd + args(*setup, tmp_path / "killed", **extra), env, tmp_path / "killed" / "checkpoints" / "latest", 120)
    resumed = subprocess.run(cmd + args(*setup, tmp_path / "killed", **extra) + ["--resume"], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    curve = lambda out: [(r["step"], r["loss"]) for r in  # noqa: E731
                         map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [s for s, _ in curve(tmp_path / "killed")] == list(range(1, 9))
    assert [loss for _, loss in curve(tmp_path / "killed")] == pytest.approx([loss for _, loss in curve(tmp_path / "full")],
                                                                            abs=1e-5)
