"""What the distillation data does to a pruned student's general ability: plays, a teacher-generated corpus, a mix.

The 90M width student of benchmarks/distill_recovery.py (SmolLM2-135M-Instruct pruned on hidden, MLP and
heads) is distilled from the teacher for the same token budget and schedule as there, on
  plays        the Shakespeare training plays (the recovery benchmark's `kd` run: the same command)
  generated    the general corpus `taille generate` sampled from the teacher (chat JSONL)
  mix          the two, 50/50 by blocks (`--data shakespeare:0.5,CORPUS:0.5`)
and each student, the teacher and the un-distilled pruned student are measured alike: held-out perplexity
on the plays and on WikiText-2, zero-shot ARC-Easy, PIQA, WinoGrande and HellaSwag through
lm-evaluation-harness on the local task files (the first --limit examples of each).

Run:  .venv/bin/python benchmarks/distill_data.py --wikitext2 PATH/wiki.test.raw --task-data PATH/eval \
          --corpus ~/.cache/taille/bench/generated/general.jsonl
Each finished run and measurement is kept in the recovery benchmark's work folder, so the command run
again goes on where it stopped. Writes benchmarks/results/distill_data.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from distill_recovery import RESULTS, TEACHER, add_train_options, pruned_students, remember, run_summary, taille, train_args

TASKS = "arc_easy,piqa,winogrande,hellaswag"


def measure(model: str, args, folder: Path) -> dict:
    """One `taille eval` row: perplexity on both texts and the zero-shot tasks, read from its eval.json (not
    from stdout, where lm-evaluation-harness may print too)."""
    cmd = [sys.executable, "-m", "taille", "eval", model, "--ppl", "shakespeare:heldout", "--ppl",
           f"wikitext2:{args.wikitext2}", "--max-tokens", str(args.eval_tokens), "--tasks", TASKS,
           "--task-data", args.task_data, "--limit", str(args.limit), "--out", str(folder)]
    subprocess.run(cmd, check=True)
    report = json.loads((folder / "eval.json").read_text())
    (row,) = report["rows"]
    return {"row": row, "n_samples": report.get("n_samples"), "config": report.get("config")}


def drawn(run: Path, student: Path) -> list[dict]:
    """Per source, what the run drew: recomputed from its data spec, seed and length (runs recorded before
    taille wrote this into taille.json are read the same way)."""
    from taille.data.mixture import load_blocks, run_order, trained_on
    from taille.models.load import load_tokenizer

    record = json.loads((run / "taille.json").read_text())["distill"]
    cfg = record["config"]
    blocks = load_blocks(cfg["data"], load_tokenizer(str(student)), cfg["seq_len"], progress=False, seed=cfg["seed"])
    return trained_on(blocks, run_order(blocks, cfg["seed"], 0, record["steps"] * record["global_batch"]),
                      cfg["data"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wikitext2", required=True)
    parser.add_argument("--task-data", required=True, help="local task files (the layout of shared/data/eval)")
    parser.add_argument("--corpus", required=True, help="the generated chat JSONL (`taille generate --out`)")
    parser.add_argument("--limit", type=int, default=500, help="examples per zero-shot task")
    parser.add_argument("--work", default=None, help="default: TAILLE_CACHE/bench/distill_recovery")
    add_train_options(parser)
    args = parser.parse_args()

    from taille.paths import cache_dir

    work = Path(args.work) if args.work else cache_dir("bench") / "distill_recovery"
    work.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus).expanduser().resolve()
    if not corpus.is_file():
        sys.exit(f"--corpus {corpus}: no such file (make it with `taille generate`)")
    width, _ = pruned_students(work)
    sources = {"plays": "shakespeare", "generated": str(corpus), "mix": f"shakespeare:0.5,{corpus}:0.5"}
    runs = {"plays": work / "runs" / "kd", "generated": work / "runs" / "data-generated",
            "mix": work / "runs" / "data-mix"}
    tag = f"limit{args.limit}"
    models = {"teacher": TEACHER, "pruned (no distillation)": str(width)}
    models |= {f"distilled on {name}": str(out) for name, out in runs.items()}
    measured = {}
    for label, model in models.items():  # the two references first: they need no training
        name = label.removeprefix("distilled on ")
        if name in runs and not (runs[name] / "taille.json").exists():
            taille("distill", "--student", width, "--teacher", TEACHER, *train_args(args, sources[name]),
                   "--out", runs[name], "--resume")
        measured[label] = remember(work / "data-rows" / f"{Path(model).name}-{tag}.json",
                                   lambda model=model: measure(model, args, work / "eval" / f"{Path(model).name}-{tag}"))
    trained = {f"distilled on {name}": {"data": sources[name], **run_summary(runs[name]),
                                         "trained_on": drawn(runs[name], width)} for name in sources}
    write_tables(measured, trained, args)


def write_tables(measured: dict, trained: dict, args) -> None:
    from taille.eval.run import markdown, plot

    report = {"rows": [m["row"] for m in measured.values()],
              "labels": {m["row"]["model"]: label for label, m in measured.items()}}
    runs = ["| student | data | blocks drawn (distinct) / passes per source | train KL (last 10%) | "
            "held-out KL to teacher (plays) | tokens/s |", "|---|---|---|---|---|---|"]
    for label, t in trained.items():
        seen = "; ".join(f"{Path(p['source']).name}: {p['drawn']} ({p['distinct']}) / {p['passes']}" for p in t["trained_on"])
        runs.append(f"| {label} | `{t['data'].replace(str(Path.home()), '~')}` | {seen} | {t['final_loss']} | "
                    f"{t['eval_kl']} | {t['tokens_per_s']} |")
    n = next(iter(measured.values()))["n_samples"]
    note = (f"Budget {args.tokens} tokens per run (seq {args.seq_len}, batch {args.batch_size}, lr {args.lr} -> "
            f"{args.lr / 10} cosine, forward KL from the live teacher, bf16-mixed). Perplexity: the first "
            f"{args.eval_tokens:,} tokens of each text, window = stride = 1024. Zero-shot: lm-evaluation-harness, "
            "0-shot, acc_norm (WinoGrande acc), examples per task: "
            + ", ".join(f"{t} {v['effective']}" for t, v in (n or {}).items())
            + "; one standard error is about 2 points at 500 examples.")
    text = markdown(report) + "\n\n" + "\n".join(runs) + "\n\n" + note + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill_data.md").write_text(text)
    (RESULTS / "distill_data.json").write_text(json.dumps({"measured": measured, "trained": trained,
                                                          "settings": vars(args)}, indent=1) + "\n")
    plot(report, RESULTS / "distill_data.png")
    print(text)


if __name__ == "__main__":
    main()
