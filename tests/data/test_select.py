"""`taille select` (MiniPLM's difference sampling): each pool block's score equals a log-likelihood gap
written out here, the kept blocks are the best-scoring ones in pool order, their text gives back their
tokens, and distillation reads the file."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taille.data.mixture import load_blocks
from taille.models.load import load_model
from tests.conftest import run_cli, save_tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    teacher = save_tiny(root / "teacher", "llama", seed=1)
    reference = save_tiny(root / "reference", "llama", seed=2)
    data = root / "pool.txt"
    rng = np.random.default_rng(0)
    words = "when shall we three meet again in thunder lightning or rain upon the heath battle lost won".split()
    data.write_text(" ".join(rng.choice(words, 3000)))
    return teacher, reference, data


def mean_gap(teacher, reference, block: list[int]) -> float:
    """mean over predicted tokens of log p_teacher - log p_reference, one plain forward each."""
    ids = torch.tensor([block])
    with torch.no_grad():
        gaps = []
        for model in (teacher, reference):
            logp = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
            gaps.append(logp.gather(-1, ids[0, 1:, None])[:, 0])
    return float((gaps[0] - gaps[1]).mean())


def test_select_keeps_the_blocks_where_the_teacher_is_furthest_ahead(setup, tmp_path, capsys):
    teacher, reference, data = setup
    out = tmp_path / "sel.jsonl"
    printed, _ = run_cli(capsys, "select", "--teacher", teacher, "--reference", reference, "--data", data,
                         "--tokens", 8 * 32, "--pool", 3, "--seq-len", 32, "--batch-size", 5, "--precision", "fp32",
                         "--out", out)
    assert "kept 8 of 24 blocks" in printed
    t, tokenizer = load_model(teacher, device="cpu")
    r, _ = load_model(reference, device="cpu")
    pool = np.asarray(load_blocks(str(data), tokenizer, 32, progress=False))[:24]
    expected = np.array([mean_gap(t, r, block.tolist()) for block in pool])
    best = sorted(np.argsort(-expected)[:8].tolist())

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["block"] for r in records] == best  # the 8 best of 24, in pool order
    assert [r["score"] for r in records] == pytest.approx(expected[best].tolist(), abs=1e-4)
    assert min(r["score"] for r in records) >= np.sort(expected)[-8] - 1e-4
    for record in records:  # the text is the block
        assert tokenizer(record["text"], add_special_tokens=False)["input_ids"] == pool[record["block"]].tolist()
    meta = json.loads((tmp_path / "sel.jsonl.meta.json").read_text())
    assert meta["pool_blocks"] == 24 and meta["kept"]["blocks"] == 8 and meta["dropped"]["blocks"] == 16
    assert meta["kept"]["mean"] > meta["dropped"]["mean"]

    # distillation reads the selection as it reads any JSONL text
    run_cli(capsys, "distill", "--teacher", teacher, "--student", reference, "--data", out, "--tokens", 256,
            "--seq-len", 32, "--batch-size", 4, "--eval-data", data, "--eval-every", 100, "--precision", "fp32",
            "--out", tmp_path / "run")
    assert (tmp_path / "run" / "taille.json").exists()


def test_a_mixture_pool_keeps_each_repeated_block_once(setup, tmp_path, capsys):
    teacher, reference, data = setup
    small = tmp_path / "small.txt"
    small.write_text("upon the heath there to meet with macbeth " * 12)  # a few blocks, repeated in the pool
    out = tmp_path / "mix.jsonl"
    run_cli(capsys, "select", "--teacher", teacher, "--reference", reference, "--data", f"{data}:0.5,{small}:0.5",
            "--tokens", 12 * 32, "--pool", 2, "--seq-len", 32, "--precision", "fp32", "--out", out)
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    meta = json.loads((tmp_path / "mix.jsonl.meta.json").read_text())
    assert meta["distinct_blocks"] < meta["pool_blocks"] == 24  # the small source came more than once
    assert len(texts) == len(set(texts)) == min(12, meta["distinct_blocks"])
