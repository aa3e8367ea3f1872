"""One shipped recipe end to end on this machine, timed, then measured on recovery_general's perplexity protocol.

`taille run RECIPE --out OUT` on a new OUT (a finished stage of an old run is not run again, so not timed),
its stage timings (OUT/timings.json) and its report's rows (held-out plays at the recipe's own eval budget, KL
to the teacher, the in-character sample); then `taille eval OUT/distilled --ppl shakespeare:heldout --ppl
wikitext2:PATH --max-tokens 65536` (window 1024, recovery_general's protocol, so a recipe's 96K student sits on
the same scale as that benchmark's 512K rows). Prints a table; writes benchmarks/results/NAME.json.

Run:  .venv/bin/python benchmarks/recipe_run.py smollm2-135m-to-90m-general --wikitext2 PATH/wiki.test.raw \
          --out runs/general --name general_recipe
Alone on the 2-core AVX512-BF16 CPU: ~10 minutes for the 96K recipes, ~2 more for the 65K-token perplexities.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from distill_recovery import RESULTS, taille

EVAL_TOKENS = 65536


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a shipped recipe's name or a YAML file")
    parser.add_argument("--wikitext2", required=True, help="WikiText-2's wiki.test.raw")
    parser.add_argument("--out", required=True, help="the run's folder")
    parser.add_argument("--name", required=True, help="results file stem (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"--out {out}: the folder holds a run, whose finished stages would not run again (nor be timed); "
                 "give a new folder")

    started = time.time()
    taille("run", args.recipe, "--out", out)
    wall = time.time() - started
    taille("eval", out / "distilled", "--ppl", "shakespeare:heldout", "--ppl", f"wikitext2:{args.wikitext2}",
           "--max-tokens", EVAL_TOKENS, "--out", out / f"eval-{EVAL_TOKENS}")

    result = collect(out, args.recipe, wall)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    table(result)


def collect(out: Path, recipe: str, wall: float) -> dict:
    """What a finished run under `out` measured: its stage timings, its report's perplexities (each source of the
    recipe's eval), KL and in-character sample per model, and the 64K-token perplexities of its student."""
    report = json.loads((out / "eval" / "eval.json").read_text())
    labels = report["labels"]
    rows = {labels.get(r["model"], r["model"]): r for r in report["rows"]}
    measured = json.loads((out / f"eval-{EVAL_TOKENS}" / "eval.json").read_text())["rows"][0]["ppl"]
    characters = {labels.get(r["model"], r["model"]): {k: r[k] for k in ("knowledge_acc", "knowledge_n", "break_rate",
                                                                         "in_character", "degenerate_rate", "replies")}
                  for r in report.get("characters", {}).get("rows", [])}
    return {
        "what": f"`taille run {recipe} --out {out}` then `taille eval {out}/distilled --ppl shakespeare:heldout "
                f"--ppl wikitext2:wiki.test.raw --max-tokens {EVAL_TOKENS}` (benchmarks/recipe_run.py)",
        "wall_seconds": round(wall, 1),
        "stage_seconds": json.loads((out / "timings.json").read_text()),
        "report_ppl": {label: {src: round(v["ppl"], 2) for src, v in r["ppl"].items()} for label, r in rows.items()},
        "report_kl": {label: round(r["kl_to_reference"], 4) for label, r in rows.items() if label != "teacher"},
        "ppl_64k": {src: round(v["ppl"], 3) for src, v in measured.items()},
        "characters": characters,
    }


def table(result: dict) -> None:
    """The run as a markdown table: one row per model of its report, the student's 64K perplexities beside."""
    sources = sorted({src for ppl in result["report_ppl"].values() for src in ppl})
    wide = list(result["ppl_64k"])
    print("| model | " + " | ".join(f"{s} ppl (report)" for s in sources) + " | KL | "
          + " | ".join(f"{s} ppl (64K)" for s in wide) + " |")
    print("|---|" + "---|" * (len(sources) + 1 + len(wide)))
    for label, ppl in result["report_ppl"].items():
        cells = [str(ppl.get(s, "-")) for s in sources] + [str(result["report_kl"].get(label, "-"))]
        cells += [str(result["ppl_64k"][s]) if label == "distilled" else "-" for s in wide]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\nwall {result['wall_seconds']:.0f} s; stages: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in result["stage_seconds"].items()))

if __name__ == "__main__":
    main()
