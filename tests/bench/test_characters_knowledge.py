"""benchmarks/characters_knowledge.py's statistics: McNemar's exact test against counting every outcome, and the
paired comparison of two rows' answers."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for module in ("characters_knowledge", "characters", "distill_recovery"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    import characters_knowledge

    return characters_knowledge


@pytest.mark.parametrize("wins,losses", [(0, 0), (0, 5), (5, 0), (3, 3), (1, 9), (4, 7), (2, 10), (6, 5)])
def test_mcnemar_is_the_share_of_sign_patterns_at_least_as_uneven(bench, wins, losses):
    n = wins + losses  # were both rows equally good, each discordant question goes either way with p = 1/2
    uneven = abs(wins - n / 2)
    patterns = list(itertools.product((0, 1), repeat=n))
    expected = sum(abs(sum(p) - n / 2) >= uneven for p in patterns) / len(patterns)
    assert bench.mcnemar(wins, losses) == pytest.approx(expected)


def test_paired_counts_only_the_questions_the_two_rows_answer_differently(bench):
    mine = [True, True, True, False, False, True, True]
    theirs = [True, False, False, True, False, False, True]
    assert bench.paired(mine, theirs) == {"wins": 3, "losses": 1, "p": pytest.approx(0.625)}
    with pytest.raises(ValueError):  # answers to other questions are never compared
        bench.paired(mine, theirs[:-1])


def test_summary_counts_the_table_questions_apart_and_pairs_with_each_measured_baseline(bench):
    in_table = [True, True, False, False]
    rows = {"plays": {"right": [True, False, True, True]}, "x": {"right": [True, True, True, False]}}
    got = bench.summary(rows["x"], rows, in_table)
    assert got["acc"] == 0.75 and got["n"] == 4 and got["table_acc"] == 1.0 and got["table_n"] == 2
    assert got["vs_plays"] == {"wins": 1, "losses": 1, "p": 1.0}
    assert "vs_general" not in got  # not measured: nothing to pair with
