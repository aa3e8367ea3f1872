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
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_TOKENS = 65536


def taille(*args) -> None:
    subprocess.run([sys.executable, "-m", "taille", *map(str, args)], check=True)


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

    report = json.loads((out / "eval" / "eval.json").read_text())
    labels = report["labels"]
    rows = {labels.get(r["model"], r["model"]): r for r in report["rows"]}
    (plays,) = report["settings"]["ppl"]
    measured = json.loads((out / f"eval-{EVAL_TOKENS}" / "eval.json").read_text())["rows"][0]["ppl"]
    characters = {labels.get(r["model"], r["model"]): {k: r[k] for k in ("knowledge_acc", "knowledge_n", "break_rate",
                                                                         "in_character", "degenerate_rate", "replies")}
                  for r in report.get("characters", {}).get("rows", [])}
    result = {
        "what": f"`taille run {args.recipe} --out {out}` then `taille eval {out}/distilled --ppl shakespeare:heldout "
                f"--ppl wikitext2:wiki.test.raw --max-tokens {EVAL_TOKENS}` (benchmarks/recipe_run.py)",
        "wall_seconds": round(wall, 1),
        "stage_seconds": json.loads((out / "timings.json").read_text()),
        "report_ppl": {label: round(next(iter(r["ppl"].values()))["ppl"], 2) for label, r in rows.items()},
        "report_ppl_data": plays,
        "report_kl": {label: round(r["kl_to_reference"], 4) for label, r in rows.items() if label != "teacher"},
        f"ppl_{EVAL_TOKENS // 1024}k": {name: round(v["ppl"], 3) for name, v in measured.items()},
        "characters": characters,
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"| {args.recipe} | seconds | plays ppl (report) | KL | " + " | ".join(f"{n} ppl ({EVAL_TOKENS // 1024}K)"
                                                                                  for n in measured) + " |")
    print("|---|---|---|---|" + "---|" * len(measured))
    print(f"| distilled | {wall:.0f} | {result['report_ppl'].get('distilled')} | {result['report_kl'].get('distilled')} | "
          + " | ".join(str(v) for v in result[f"ppl_{EVAL_TOKENS // 1024}k"].values()) + " |")


if __name__ == "__main__":
    main()
