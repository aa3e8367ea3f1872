"""--loss-on replies: the mask holds exactly the assistant's turns (through their end-of-turn token) of every
block, wherever the blocks cut the conversations, in a mixture too; a step's loss is the mean over those
tokens alone; what cannot be masked is refused in one line."""

import json

import numpy as np
import pytest
import torch

from taille.errors import TailleError
from tests.conftest import run_cli
from tests.distill.test_train import args, make_setup

MARKER, END = [7, 8, 9], 5


def scanned(stream, marker=MARKER, ends=(END,)):
    """The reply tokens of a stream by a plain left-to-right scan: on after a whole marker, off after an end."""
    out, inside, m = [], False, len(marker)
    for j, token in enumerate(stream):
        if j >= m and list(stream[j - m:j]) == list(marker):
            inside = True
        out.append(inside)
        if token in ends:
            inside = False
    return np.array(out)


def synthetic(rng, n, marker=MARKER):
    """Random tokens 10..29 with markers and ends dropped in, some markers right before an end."""
    stream = rng.integers(10, 30, n)
    for j in rng.choice(n - len(marker), n // 12, replace=False):
        stream[j:j + len(marker)] = marker
    stream[rng.choice(n, n // 15, replace=False)] = END
    return stream


@pytest.mark.parametrize("marker", [MARKER, [7, END]], ids=["header", "header-ending-in-an-end-token"])
def test_reply_tokens_match_a_plain_scan_across_blocks_and_chunks(monkeypatch, marker):
    """Blocks of 16 cut markers and replies anywhere; the stream is scanned in chunks of 50 tokens, with
    headers planted across the chunks' edges and the blocks' edges (a header whose last token also ends a
    turn opens a reply, as the scan reads it)."""
    import taille.distill.replies as replies

    monkeypatch.setattr(replies, "CHUNK", 50)
    stream = synthetic(np.random.default_rng(0), 16 * 40, marker)
    m = len(marker)
    for edge in (50, 100, 150):  # chunk edges: a turn ended just before, a header cut by each
        stream[edge - 4:edge - 1] = [11, END, 11]
        stream[edge - 1:edge - 1 + m] = marker
        stream[edge - 1 + m:edge + m + 1] = [11, 12]
    stream[16 * 20 - m - 3:16 * 20 + 2] = [11, END, 11] + marker + [11, 12]  # a header ending at a block's edge
    stream[16 * 25 - 4:16 * 25 - 1 + m + 2] = [11, END, 11] + marker + [11, 12]  # one cut by it
    stream[16 * 7 - 2:16 * 7 + 3] = [END, 7, 11, 12, 13]  # half a header: not one
    mask = replies.ReplyMask(stream.reshape(40, 16), marker, [END])
    expected = scanned(stream, marker).reshape(40, 16)
    rows = np.random.default_rng(1).permutation(40)
    assert np.array_equal(mask(rows), expected[rows])
    flat = expected.reshape(-1)
    assert 0.2 < flat.mean() < 0.8  # both kinds of token are there to get wrong
    assert flat[[50 - 1 + m, 100 - 1 + m, 150 - 1 + m]].all() and not flat[[48, 98, 148]].any()
    assert expected[20, 0] and expected[25, m - 1] and not expected[25, 0] and not expected[7, :3].any()


def test_a_mixtures_rows_are_masked_from_their_own_source():
    """Each mixed row is the block its source gave it, masked by that source's stream alone; a plain-text
    source (no assistant header anywhere) counts every token."""
    from taille.data.mixture import MixedBlocks
    from taille.distill.replies import ReplyMask

    chat = synthetic(np.random.default_rng(2), 16 * 30).reshape(30, 16)
    plain = np.random.default_rng(3).integers(10, 30, (20, 16))
    mixed = MixedBlocks([("chat", 0.6), ("plain", 0.4)], [chat, plain], seed=4)
    mask = ReplyMask(mixed, MARKER, [END])
    rows = np.arange(len(mixed))
    got = mask(rows)
    by_chat = scanned(chat.reshape(-1)).reshape(30, 16)
    for r in rows:
        expected = by_chat[mixed.index[r]] if mixed.which[r] == 0 else np.ones(16, bool)
        assert np.array_equal(got[r], expected), r
    assert got[mixed.which == 0].any() and not got[mixed.which == 0].all() and (mixed.which == 1).any()
    shares = mask.shares(rows)
    assert shares["plain"] == 1.0 and shares["chat"] == pytest.approx(got[mixed.which == 0][:, 1:].mean())


def test_chat_turns_without_an_assistant_reply_are_refused_not_counted_whole():
    """A source with the template's turn token but no assistant header (prompts only, another role) is chat
    with nothing to learn from, not plain text: refused in one line, naming it."""
    from taille.data.mixture import MixedBlocks
    from taille.distill.replies import ReplyMask

    chat = synthetic(np.random.default_rng(2), 16 * 30).reshape(30, 16)
    prompts = np.random.default_rng(3).integers(10, 30, (20, 16))
    prompts[4, 3] = MARKER[0]  # a turn opens, never the assistant's
    with pytest.raises(TailleError, match="--loss-on replies: prompts holds chat turns but no assistant reply"):
        ReplyMask(MixedBlocks([("chat", 0.6), ("prompts", 0.4)], [chat, prompts], seed=4), MARKER, [END], MARKER[0])


def chat_file(tmp_path):
    data = tmp_path / "chat.jsonl"
    turns = [("system", "You are Bram, the ferryman."), ("user", "Where the place?"), ("assistant", "Upon the heath."),
             ("user", "When shall we three meet?"), ("assistant", "When the battle is lost and won, in thunder.")]
    data.write_text("\n".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns[:k]]})
                              for k in (3, 5, 5, 3, 5) * 12))
    return data


def test_the_mask_holds_the_assistants_words_and_its_end_of_turn(tmp_path):
    """On a chat template's rendering: the masked tokens of the run's blocks decode to the assistant's
    contents, each closed by the end-of-turn token, and nothing of the system card or the user's lines."""
    import taille.distill.train as train

    teacher, student, _, _ = make_setup(tmp_path, tied=False)
    cfg = train.DistillConfig(student=str(student), teacher=str(teacher), data=str(chat_file(tmp_path)),
                              eval_data=None, out=str(tmp_path / "o"), tokens=1024, seq_len=64, batch_size=4,
                              precision="fp32", progress=False, loss_on="replies")
    run = train.setup(cfg)
    stream = np.asarray(run.blocks).reshape(-1)
    kept = stream[run.replies(np.arange(len(run.blocks))).reshape(-1)]
    text = run.tokenizer.decode(kept.tolist())
    replies = {"Upon the heath.", "When the battle is lost and won, in thunder."}
    *whole, last = text.split("<eos>")  # the blocks hold the stream in order: whole replies, the last one cut
    assert set(whole) == replies and len(whole) > 20
    assert any(r.startswith(last) for r in replies)
    assert "ferryman" not in text and "Where" not in text and "three meet" not in text


def test_a_step_is_the_mean_loss_over_the_reply_tokens(tmp_path):
    """One optimizer step with --loss-on replies reports sum(KL at reply targets) / their count, computed
    here from the two models' logits directly (forward KL, fp32)."""
    import torch.nn.functional as F

    import taille.distill.train as train
    from taille.data.mixture import run_order

    teacher, student, _, _ = make_setup(tmp_path, tied=False)
    cfg = train.DistillConfig(student=str(student), teacher=str(teacher), data=str(chat_file(tmp_path)),
                              eval_data=None, out=str(tmp_path / "o"), tokens=1024, seq_len=64, batch_size=4,
                              grad_accum=2, precision="fp32", progress=False, loss_on="replies")
    run = train.setup(cfg)
    step = 2
    rows = run_order(run.blocks, cfg.seed, step * run.global_batch, run.global_batch)
    ids = torch.from_numpy(np.asarray(run.blocks[rows]).astype(np.int64))
    with torch.no_grad():
        t = F.log_softmax(run.teacher(ids).logits[:, :-1].float(), -1)
        s = F.log_softmax(run.student(ids).logits[:, :-1].float(), -1)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T - 1)
    where = torch.from_numpy(run.replies(rows)[:, 1:])
    assert 0 < where.float().mean() < 0.6
    expected = kl[where].sum() / where.sum()
    assert not torch.isclose(expected, kl.mean(), rtol=1e-3)  # the masked mean is not the plain one
    run.student.zero_grad(set_to_none=True)
    with torch.enable_grad():  # the gradient of that mean: what the step's clipping measures
        s = F.log_softmax(run.student(ids).logits[:, :-1].float(), -1)
        ((t.exp() * (t - s)).sum(-1)[where].sum() / where.sum()).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in run.student.parameters() if p.grad is not None]))
    run.student.zero_grad(set_to_none=True)
    got = train.train_step(run, step)
    torch.testing.assert_close(got["loss"], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["grad_norm"], norm, rtol=1e-3, atol=1e-6)


def test_a_step_with_no_reply_is_skipped(tmp_path, monkeypatch):
    """A global batch without a reply token leaves the weights as they were (no decay, no momentum)."""
    import taille.distill.train as train

    teacher, student, _, _ = make_setup(tmp_path, tied=False)
    cfg = train.DistillConfig(student=str(student), teacher=str(teacher), data=str(chat_file(tmp_path)),
                              eval_data=None, out=str(tmp_path / "o"), tokens=1024, seq_len=64, batch_size=4,
                              precision="fp32", progress=False, loss_on="replies")
    run = train.setup(cfg)
    before = {k: v.clone() for k, v in run.student.state_dict().items()}
    train.train_step(run, 0)
    assert any(not torch.equal(before[k], v) for k, v in run.student.state_dict().items())
    before = {k: v.clone() for k, v in run.student.state_dict().items()}
    monkeypatch.setattr(run.replies, "__call__", None, raising=False)
    run.replies = lambda rows: np.zeros((len(rows), cfg.seq_len), dtype=bool)
    assert float(train.train_step(run, 1)["loss"]) == 0
    assert all(torch.equal(before[k], v) for k, v in run.student.state_dict().items())


@pytest.mark.parametrize("extra, message", [
    ({"--loss-on": "assistant"}, "--loss-on assistant: use one of all, replies"),
    ({"--loss-on": "replies", "--on-policy": 0.5, "--on-policy-tokens": 8},
     "--loss-on replies with --on-policy: that term is taken at every position; use --loss-on all with it"),
    ({"--loss-on": "replies", "--hidden-layers": "auto"}, "--loss-on replies with --hidden-layers"),
    ({"--loss-on": "replies"}, "--loss-on replies: the training data holds no assistant reply"),
])
def test_what_cannot_be_masked_is_refused_in_one_line(tmp_path, capsys, extra, message):
    teacher, student, data, held = make_setup(tmp_path, tied=False)
    _, err = run_cli(capsys, *args(teacher, student, data, held, tmp_path / "o", **extra), code=2)
    assert message in err and "Traceback" not in err


def test_replies_need_a_chat_template(tmp_path, capsys):
    from tests.conftest import save_tiny

    teacher, _, data, held = make_setup(tmp_path, tied=False)
    plain = save_tiny(tmp_path / "plain", "llama", seed=2, chat_template=None)
    _, err = run_cli(capsys, *args(teacher, plain, data, held, tmp_path / "o", **{"--loss-on": "replies"}), code=2)
    assert "--loss-on replies: the student's tokenizer has no chat template to find replies by; use --loss-on all" in err


def test_a_cache_of_one_chat_source_is_masked_and_a_mixtures_is_refused(tmp_path, capsys):
    """A teacher cache of one source keeps its stream's order, so its rows are masked as the live run's are;
    a mixture's cached rows come from several streams and are refused."""
    import taille.distill.train as train

    teacher, student, _, held = make_setup(tmp_path, tied=False)
    chat = chat_file(tmp_path)
    run_cli(capsys, "teacher-cache", "--teacher", teacher, "--data", chat, "--out", tmp_path / "cache", "--top-k", 8,
            "--seq-len", 64, "--precision", "fp32")
    cached = train.setup(train.DistillConfig(student=str(student), teacher_cache=str(tmp_path / "cache"), data=None,
                                             eval_data=None, out=str(tmp_path / "a"), tokens=1024, seq_len=64,
                                             batch_size=4, precision="fp32", progress=False, loss_on="replies"))
    live = train.setup(train.DistillConfig(student=str(student), teacher=str(teacher), data=str(chat), eval_data=None,
                                           out=str(tmp_path / "b"), tokens=1024, seq_len=64, batch_size=4,
                                           precision="fp32", progress=False, loss_on="replies"))
    rows = np.arange(len(cached.blocks))
    assert np.array_equal(np.asarray(cached.blocks), np.asarray(live.blocks)[rows])
    assert np.array_equal(cached.replies(rows), live.replies(rows)) and cached.replies(rows).any()
    run_cli(capsys, "teacher-cache", "--teacher", teacher, "--data", f"{chat}:0.5,{held}:0.5", "--out",
            tmp_path / "mixed", "--top-k", 8, "--seq-len", 64, "--precision", "fp32")
    _, err = run_cli(capsys, "distill", "--student", student, "--teacher-cache", tmp_path / "mixed", "--out",
                     tmp_path / "o", "--seq-len", 64, "--batch-size", 4, "--loss-on", "replies", code=2)
    assert "--loss-on replies with a teacher cache of a mixture" in err and "Traceback" not in err


def test_teacher_correction_on_replies_is_the_cross_entropy_of_the_reply_tokens(tmp_path, capsys):
    """`taille correct --loss-on replies`: a step's loss is the teacher's mean cross-entropy at the reply targets
    alone (computed here from its logits), not over the cards and player lines; the option reaches the CLI."""
    import torch.nn.functional as F

    import taille.distill.train as train
    from taille.data.mixture import run_order
    from taille.distill.config import CorrectConfig

    teacher, _, _, _ = make_setup(tmp_path, tied=False)
    cfg = CorrectConfig(teacher=str(teacher), data=str(chat_file(tmp_path)), out=str(tmp_path / "o"), tokens=1024,
                        seq_len=64, batch_size=4, precision="fp32", loss_on="replies").distill_config()
    cfg.progress = False
    run = train.setup(cfg)
    rows = run_order(run.blocks, cfg.seed, 0, run.global_batch)
    ids = torch.from_numpy(np.asarray(run.blocks[rows]).astype(np.int64))
    with torch.no_grad():
        logp = F.log_softmax(run.student(ids).logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    where = torch.from_numpy(run.replies(rows)[:, 1:])
    assert 0 < where.float().mean() < 0.6
    expected = nll[where].mean()
    assert not torch.isclose(expected, nll.mean(), rtol=1e-3)
    torch.testing.assert_close(train.train_step(run, 0)["loss"], expected, rtol=1e-4, atol=1e-6)
    run_cli(capsys, "correct", "--teacher", teacher, "--data", chat_file(tmp_path), "--out", tmp_path / "cli",
            "--tokens", 512, "--seq-len", 64, "--batch-size", 4, "--loss-on", "replies", "--precision", "fp32")
    record = json.loads((tmp_path / "cli" / "taille.json").read_text())["distill"]
    assert record["config"]["loss_on"] == "replies" and record["config"]["loss"]["kd_weight"] == 0
