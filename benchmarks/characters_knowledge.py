"""Knowledge on five times the questions: the characters table's knowledge column, paired between rows.

benchmarks/characters.py asks 195 knowledge questions (every fact of the 39 held-out cards of `taille personas
make --count 200 --seed 0`). Most of its rows score 97-100% there: one question is half a point, and two rows'
binomial errors overlap. Here the same question maker and the same scorer (`taille eval --personas`:
taille.characters.questions.knowledge_items with the eval's seed, taille.characters.evaluate.knowledge_scores in
the precision `auto` picks, the same batch size) ask every fact of the held-out cards of `taille personas make
--count 1000 --seed 0` (203 cards; its first 200 cards are the characters table's 200, so that table's 195
questions are among these and are reported apart as a check). Each row is then compared with the plays-only and
the general-only students question by question: how many questions one gets right and the other wrong, and
McNemar's exact two-sided p-value on those (the test that uses the pairing; the rows' own errors ignore it).

The models are benchmarks/recovery_general.py's run folders (and the teacher and the pruned student); a row whose
folder is missing is left out: `recovery_general.py --only ROW` trains it again (its committed WikiText-2 and
zero-shot measurement is kept), and the subset column then shows how far the new run sits from the table's.

Run:  .venv/bin/python benchmarks/characters_knowledge.py [--only ROW,...]
Each model's answers are kept in --work (TAILLE_CACHE/bench/characters/knowledge) as it finishes; run again to
go on. Writes benchmarks/results/characters_knowledge.{md,json} after every model.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from characters import LABELS, ROWS, label, rate, recovery_models
from distill_recovery import RESULTS, TEACHER, remember, weights_stamp

COUNT = 1000
"""Cards made (seed 0): about a fifth of them are held out (taille.characters.cards.HELDOUT_SHARE)."""
TABLE_COUNT = 200
"""The characters table's card set (benchmarks/characters.py)."""
BASELINES = ("plays", "general")
"""The issue's goal compares the character student with these two on knowledge."""


def mcnemar(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: the chance, were both models equally good, of a split of the
    wins + losses discordant questions at least this uneven (binomial, p = 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(mine: list[bool], theirs: list[bool]) -> dict:
    """Questions this row gets right and the other wrong (wins), the other way round (losses), and the
    p-value of that split."""
    wins = sum(a and not b for a, b in zip(mine, theirs, strict=True))
    losses = sum(b and not a for a, b in zip(mine, theirs, strict=True))
    return {"wins": wins, "losses": losses, "p": mcnemar(wins, losses)}


def answers(model: str, cards: list, table_ids: set[str], batch_size: int) -> dict:
    """One model's answer to every question: right or wrong, keyed by card and fact, in the cards' order."""
    from taille.characters.evaluate import knowledge_scores
    from taille.characters.questions import knowledge_items
    from taille.characters.settings import PersonaEvalSettings
    from taille.models.load import load_model, resolve_device
    from taille.models.precision import resolve_precision

    seed = PersonaEvalSettings().seed  # the eval's questions: the same card gives the same items
    asked = [(persona, knowledge_items(persona, seed)[0]) for persona in cards]
    start = time.perf_counter()
    net, tokenizer = load_model(model, dtype="auto", device="auto")
    precision = resolve_precision("auto", resolve_device("auto"))
    scores = knowledge_scores(net, tokenizer, asked, batch_size, precision)
    items = [(persona, item) for persona, its in asked for item in its]
    right = [max(range(4), key=lambda k: s[k]) == item.answer for s, (_, item) in zip(scores, items, strict=True)]
    return {"model": model, "precision": precision, "batch_size": batch_size,
            "seconds": round(time.perf_counter() - start, 1),
            "questions": [f"{persona.id}: {item.fact}" for persona, item in items], "right": right,
            "in_table": [persona.id in table_ids for persona, _ in items]}


def scorer_check(cards: list, batch_size: int) -> dict:
    """The teacher's scores on `cards` two ways, timed side by side: each card's system prompt run once and
    shared (shared_prefix_nll, as knowledge_scores runs it for every row here) and every sequence whole
    (continuation_nll, the scorer before it), the same token ids, after a warm-up of each: seconds, their ratio,
    the largest score difference and how many answers agree."""
    from taille.characters.evaluate import continuation_nll, render, shared_prefix_nll, user
    from taille.characters.questions import knowledge_items
    from taille.characters.settings import PersonaEvalSettings
    from taille.models.load import load_model, resolve_device
    from taille.models.precision import resolve_precision

    asked = [(persona, knowledge_items(persona, PersonaEvalSettings().seed)[0]) for persona in cards]
    net, tokenizer = load_model(TEACHER, dtype="auto", device="auto")
    precision = resolve_precision("auto", resolve_device("auto"))
    groups = [[(render(tokenizer, persona, user(item.question)), tokenizer(choice, add_special_tokens=False)["input_ids"])
               for item in items for choice in item.choices] for persona, items in asked]  # tokenized outside the clocks
    flat = [pair for group in groups for pair in group]
    shared_prefix_nll(net, groups[:1], batch_size, precision)  # warm-up, both ways
    continuation_nll(net, groups[0], batch_size, precision)
    start = time.perf_counter()
    nll = shared_prefix_nll(net, groups, batch_size, precision)
    shared_s = time.perf_counter() - start
    shared = [[-sum(x) for x in nll[k:k + 4]] for k in range(0, len(nll), 4)]
    start = time.perf_counter()
    nll = continuation_nll(net, flat, batch_size, precision)
    whole_s = time.perf_counter() - start
    whole = [[-sum(x) for x in nll[k:k + 4]] for k in range(0, len(nll), 4)]
    pick = lambda scores: max(range(4), key=lambda k: scores[k])  # noqa: E731
    return {"cards": len(cards), "questions": len(shared), "precision": precision,
            "shared_s": round(shared_s, 1), "whole_s": round(whole_s, 1), "speedup": round(whole_s / shared_s, 2),
            "max_diff_nats": round(max(abs(a - b) for r, w in zip(shared, whole) for a, b in zip(r, w)), 3),
            "same_answer": sum(pick(r) == pick(w) for r, w in zip(shared, whole))}


def held_out(folder: Path, count: int) -> list:
    """The held-out cards of `taille personas make --count COUNT --seed 0` (made into `folder` once), by id."""
    from taille.characters.cards import load_half

    if not (folder / "heldout").is_dir():
        subprocess.run([sys.executable, "-m", "taille", "personas", "make", "--count", str(count), "--seed", "0",
                        "--out", str(folder)], check=True)
    return sorted(load_half(folder, "heldout").values(), key=lambda p: p.id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help=f"comma-separated rows of {', '.join(ROWS)}")
    parser.add_argument("--batch-size", type=int, default=40, help="sequences scored together (characters.py's)")
    parser.add_argument("--work", default=None, help="default: TAILLE_CACHE/bench/characters/knowledge")
    parser.add_argument("--recovery-work", default=None, help="default: TAILLE_CACHE/bench/recovery_general")
    args = parser.parse_args()

    from taille.paths import cache_dir

    work = Path(args.work) if args.work else cache_dir("bench") / "characters" / "knowledge"
    recovery = Path(args.recovery_work) if args.recovery_work else cache_dir("bench") / "recovery_general"
    cards = held_out(work / f"cards-{COUNT}", COUNT)
    table = held_out(work / f"cards-{TABLE_COUNT}", TABLE_COUNT)
    mine = {p.id: p.knowledge for p in cards}
    if any(mine.get(p.id) != p.knowledge for p in table):  # the card maker's prefix property this bench rests on
        sys.exit(f"the held-out cards of --count {TABLE_COUNT} are not among those of --count {COUNT}: "
                 "the subset column would not be the characters table's questions")
    table_ids = {p.id for p in table}

    models = recovery_models(recovery)
    chosen = [r for r in (args.only.split(",") if args.only else models) if r in models]
    missing = [r for r in (args.only.split(",") if args.only else []) if r not in models]
    if missing:
        print(f"left out (no run folder; recovery_general.py --only ROW trains it): {', '.join(missing)}")

    results_path = RESULTS / "characters_knowledge.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": {}}
    results["scorer"] = remember(work / "measured" / "scorer.json", lambda: scorer_check(table[:8], args.batch_size))
    if not chosen:
        sys.exit(f"--only {args.only}: no such row measured here (rows with a run folder: {', '.join(models)})")
    for name in chosen:  # a run trained again (a new weights stamp) is measured again
        stamp = "" if name == "teacher" else f"-{weights_stamp(Path(models[name]))}"
        row = remember(work / "measured" / f"{name}{stamp}.json",
                       lambda name=name: answers(models[name], cards, table_ids, args.batch_size))
        questions, in_table = row.pop("questions"), row.pop("in_table")  # the same for every row: kept once
        if results.setdefault("questions", questions) != questions:
            sys.exit(f"{work / 'measured' / name}{stamp}.json asked other questions than the committed rows (the question "
                     "maker changed?): move the measured folder and the results away and measure every row again")
        results["in_table"] = in_table
        results["rows"][name] = row
        results["settings"] = {"count": COUNT, "cards": len(cards), "table_count": TABLE_COUNT,
                               "table_cards": len(table), "teacher": TEACHER}
        write(results)


def summary(row: dict, rows: dict, in_table: list[bool]) -> dict:
    """A row's accuracy on all questions and on the characters table's (`in_table`), and its paired
    comparisons with the baselines measured (every row answers the same questions, in the same order)."""
    right = row["right"]
    table = [r for r, t in zip(right, in_table, strict=True) if t]
    out = {"acc": sum(right) / len(right), "n": len(right),
           "table_acc": sum(table) / len(table) if table else None, "table_n": len(table)}
    for base in BASELINES:
        if base in rows and rows[base] is not row:
            out[f"vs_{base}"] = paired(right, rows[base]["right"])
    return out


def write(results: dict) -> None:
    rows = results["rows"]
    for row in rows.values():
        row["summary"] = summary(row, rows, results["in_table"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "characters_knowledge.json").write_text(json.dumps(results, indent=1))
    s = results["settings"]
    head = ["model", f"knowledge acc, {s['cards']} cards", f"the characters table's {s['table_cards']} cards",
            *(f"vs {LABELS[b]}: + / - (p)" for b in BASELINES)]
    lines = ["# Knowledge on more held-out cards (issue 16)", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for name in [r for r in ROWS if r in rows] + [r for r in rows if r not in ROWS]:
        m = rows[name]["summary"]
        compared = [f"+{c['wins']} / -{c['losses']} (p={c['p']:.2g})" if (c := m.get(f"vs_{b}")) else "-"
                    for b in BASELINES]
        lines.append("| " + " | ".join([label(name), f"{rate(m['acc'], m['n'])} (n={m['n']})",
                                         f"{rate(m['table_acc'], m['table_n'])} (n={m['table_n']})", *compared]) + " |")
    lines += ["", f"Every fact of the held-out cards of `taille personas make --count {s['count']} --seed 0` "
              f"({s['cards']} cards), asked and scored as `taille eval --personas` does (four answers by "
              "log-likelihood, chance 25%); the third column is the same models on the characters table's questions "
              f"(its {s['table_cards']} cards are among these). + / -: questions this row gets right and the "
              "baseline wrong / the other way round; p: McNemar's exact two-sided test on them, each comparison "
              "on its own (with this many rows, a p near 0.05 in one of them is expected by chance; "
              "benchmarks/characters_knowledge.py)."]
    if c := results.get("scorer"):
        lines += ["", f"Scorer: on the teacher's {c['questions']} questions of {c['cards']} cards ({c['precision']}), "
                  f"each card's system prompt run once and shared takes {c['shared_s']} s, every sequence whole "
                  f"{c['whole_s']} s ({c['speedup']}x, side by side in one run); {c['same_answer']} of "
                  f"{c['questions']} answers the same, scores {c['max_diff_nats']} nats apart at most (rounding)."]
    (RESULTS / "characters_knowledge.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
