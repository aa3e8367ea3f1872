"""--data mixtures: parsing, deterministic interleaving by weight, and a distillation that records them."""

import json

import numpy as np
import pytest

from taille.data.mixture import MixedBlocks, interleave, parse_mixture, run_order, trained_on
from taille.errors import TailleError


def test_parse_mixture():
    assert parse_mixture("shakespeare") is None and parse_mixture("shakespeare:heldout") is None
    assert parse_mixture("hf://HuggingFaceFW/fineweb-edu:sample-10BT:train") is None
    assert parse_mixture("shakespeare:3,gen.jsonl:1") == [("shakespeare", 0.75), ("gen.jsonl", 0.25)]
    assert parse_mixture("shakespeare:train:0.5, a/b.jsonl:.5") == [("shakespeare:train", 0.5), ("a/b.jsonl", 0.5)]
    assert parse_mixture("a:1,b:0") == [("a", 1.0)]  # a zero weight drops the source
    with pytest.raises(TailleError, match="'gen.jsonl' has none"):
        parse_mixture("shakespeare:0.5,gen.jsonl")
    with pytest.raises(TailleError, match="not all 0"):
        parse_mixture("a:0,b:0")


def test_interleave_keeps_every_prefix_at_its_share():
    weights = [0.5, 0.3, 0.2]
    order = interleave(weights, 1000)
    for k in range(1, 1001):
        counts = np.bincount(order[:k], minlength=3)
        assert np.all(np.abs(counts - np.asarray(weights) * k) < 1.0 + 1e-9)
    assert np.array_equal(order, interleave(weights, 1000))  # deterministic


def test_mixed_blocks_repeat_a_small_source_and_truncate_a_large_one():
    a = np.arange(2 * 4).reshape(2, 4)  # 2 blocks
    b = 100 + np.arange(8 * 4).reshape(8, 4)  # 8 blocks
    mixed = MixedBlocks([("a", 0.5), ("b", 0.5)], [a, b])
    assert mixed.shape == (10, 4) and len(mixed) == 10
    rows = mixed[np.arange(10)]
    from_a = [int(r[0]) for r in rows if r[0] < 100]
    assert len(from_a) == 5  # half the mixture from 2 blocks: 2.5 passes over a
    assert sorted(from_a[:2]) == sorted(from_a[2:4]) == [0, 4]  # each pass visits every block once
    from_b = [int(r[0]) for r in rows if r[0] >= 100]
    assert len(set(from_b)) == 5  # part of one pass over b: no block twice
    again = MixedBlocks([("a", 0.5), ("b", 0.5)], [a, b])
    np.testing.assert_array_equal(again[np.arange(10)], rows)  # the same seed, the same stream
    other = MixedBlocks([("a", 0.5), ("b", 0.5)], [a, b], seed=1)
    assert not np.array_equal(other[np.arange(10)], rows)
    np.testing.assert_array_equal(mixed[[7, 2, 7]], rows[[7, 2, 7]])  # any order, repeats
    np.testing.assert_array_equal(mixed[2:5], rows[2:5])
    assert mixed.describe() == [
        {"source": "a", "weight": 0.5, "blocks": 2, "mixture_blocks": 5, "mixture_passes": 2.5},
        {"source": "b", "weight": 0.5, "blocks": 8, "mixture_blocks": 5, "mixture_passes": 0.625}]


def test_trained_on_counts_what_a_run_drew_of_each_source():
    a, b = np.zeros((2, 4)), np.ones((8, 4))
    mixed = MixedBlocks([("a", 0.5), ("b", 0.5)], [a, b])  # positions: a b a b ...; a's blocks 0 1 0 1 0
    order = np.array([0, 2, 4, 1, 3, 0])  # a's positions 0 2 4 0 (passes 1, 1, 2, 1), b's 1 3
    parts = trained_on(mixed, order, "a:0.5,b:0.5")
    assert [(p["drawn"], p["distinct"], p["passes"]) for p in parts] == [(4, 2, 2.0), (2, 2, 0.25)]
    assert np.array_equal(run_order(mixed, 0, 8, 4), [8, 9, 0, 1])  # a mixture is read in sequence, then again
    single = run_order(b, 3, 0, 16)  # one source: a fresh permutation per epoch
    assert sorted(single[:8]) == sorted(single[8:]) == list(range(8)) and not np.array_equal(single[:8], single[8:])
    assert trained_on(b, np.array([3, 3, 5]), "b") == [
        {"source": "b", "blocks": 8, "drawn": 3, "distinct": 2, "passes": 0.375}]


def test_distillation_on_a_mixture_records_it(tmp_path, capsys):
    from tests.conftest import run_cli, save_tiny
    from tests.distill.test_train import args

    teacher = save_tiny(tmp_path / "teacher", "llama", seed=1)
    student = save_tiny(tmp_path / "student", "llama", seed=2)
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text("when shall we three meet again in thunder lightning or in rain " * 100)
    two.write_text("the quick brown fox jumps over the lazy dog " * 300)
    out = tmp_path / "run"
    run_cli(capsys, *args(teacher, student, f"{one}:0.25,{two}:0.75", one, out, **{"--tokens": 1024}))
    record = json.loads((out / "taille.json").read_text())["distill"]
    parts = {d["source"]: d for d in record["data"]}
    assert set(parts) == {str(one), str(two)}
    assert parts[str(one)]["weight"] == 0.25 and parts[str(two)]["weight"] == 0.75
    total = sum(d["mixture_blocks"] for d in record["data"])
    assert parts[str(one)]["mixture_blocks"] == round(0.25 * total)
    assert sum(d["drawn"] for d in record["data"]) == record["steps"] * record["global_batch"]
    assert all(d["distinct"] == min(d["drawn"], d["blocks"]) for d in record["data"])  # no repeat within a pass


def test_teacher_cache_over_a_mixture(tmp_path, capsys):
    from taille.data.mixture import load_blocks
    from taille.models.load import load_tokenizer
    from tests.conftest import run_cli, save_tiny

    teacher = save_tiny(tmp_path / "teacher", "llama", seed=1)
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text("when shall we three meet again in thunder lightning or in rain " * 100)
    two.write_text("the quick brown fox jumps over the lazy dog " * 300)
    spec = f"{one}:1,{two}:1"
    run_cli(capsys, "teacher-cache", "--teacher", teacher, "--data", spec, "--top-k", 8, "--seq-len", 32,
            "--tokens", 640, "--out", tmp_path / "cache")
    cached = np.load(tmp_path / "cache" / "blocks.npy")
    expected = load_blocks(spec, load_tokenizer(str(teacher)), 32)[:20]
    np.testing.assert_array_equal(cached, expected)
