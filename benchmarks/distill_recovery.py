"""How much of what pruning lost does distillation win back, and what does each choice cost?

SmolLM2-135M-Instruct is pruned to 90M by the width recipe (hidden 480, MLP 1152, 6/3 heads; activation
scores on 128 x 512 calibration tokens), then trained for the same token budget on the Shakespeare
training plays by every variant below, each through the `taille distill` command a user runs:
  kd             forward KL from the live teacher, bf16-mixed (the default)
  kd-fp32        the same in fp32 (same loss within noise? tokens/s of each)
  ce             cross-entropy fine-tuning of the same pruned student (no teacher)
  scratch-kd     the same shape from random init, distilled
  depth-kd       the depth-pruned student (block importance, 18 layers + MLP 1472), distilled
  cache-K        forward KL from a top-K teacher cache, K in --cache-k
Held-out perplexity (plays and WikiText-2) before and after, final loss, tokens/s; curves in one PNG.

Run:  .venv/bin/python benchmarks/distill_recovery.py --wikitext2 PATH/wiki.test.raw [--tokens 512K]
Writes benchmarks/results/distill_recovery.{json,md,png}. At ~300 tokens/s here, 512K tokens is about 30
minutes a run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TEACHER = "smollm2-135m-instruct"


def taille(*args) -> None:
    subprocess.run([sys.executable, "-m", "taille", *map(str, args)], check=True)


def ppl(model: str, texts: dict, max_tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "taille", "eval", model, *[a for t in texts.values() for a in ("--ppl", t)],
                          "--max-tokens", str(max_tokens), "--json"], check=True, capture_output=True, text=True).stdout
    (row,) = json.loads(out)["rows"]
    return {name: round(row["ppl"][src]["ppl"], 3) for name, src in zip(texts, row["ppl"])}


def random_init(folder: Path, like: Path) -> Path:
    """The pruned student's shape and tokenizer with fresh weights."""
    code = ("import sys, torch; from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
            "torch.manual_seed(0); c = AutoConfig.from_pretrained(sys.argv[1])\n"
            "AutoModelForCausalLM.from_config(c).save_pretrained(sys.argv[2])\n"
            "AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", code, str(like), str(folder)], check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wikitext2", required=True)
    parser.add_argument("--tokens", default="512K")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--cache-k", default="32,128,512")
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--only", default=None, help="comma-separated variants to run")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="taille-recovery-"))
    texts = {"plays": "shakespeare:heldout", "wikitext2": f"wikitext2:{args.wikitext2}"}
    taille("importance", "-m", TEACHER, "--data", "shakespeare", "--samples", 128, "--out", work / "importance")
    width, depth = work / "width-90m", work / "depth-90m"
    taille("prune", "-m", TEACHER, "--scores", work / "importance", "--params", "90M", "--axes", "mlp,hidden,heads",
           "--out", width)
    taille("prune", "-m", TEACHER, "--scores", work / "importance", "--layers", 18, "--ffn", 1472, "--out", depth)
    scratch = random_init(work / "scratch-90m", width)
    common = ["--data", "shakespeare", "--tokens", args.tokens, "--seq-len", args.seq_len, "--batch-size",
              args.batch_size, "--lr", args.lr, "--min-lr", args.lr / 10, "--warmup", 10, "--eval-every", 50,
              "--eval-tokens", 16384, "--save-every", 1000]
    variants = {
        "kd": (width, ["--teacher", TEACHER]),
        "kd-fp32": (width, ["--teacher", TEACHER, "--precision", "fp32"]),
        "ce": (width, ["--ce-weight", 1.0, "--kd-weight", 0.0]),
        "scratch-kd": (scratch, ["--teacher", TEACHER]),
        "depth-kd": (depth, ["--teacher", TEACHER]),
    }
    for k in (int(k) for k in args.cache_k.split(",") if k):
        variants[f"cache-{k}"] = (width, ["--teacher-cache", work / f"cache-{k}"])
    chosen = args.only.split(",") if args.only else list(variants)

    rows = [{"variant": "teacher", **ppl(TEACHER, texts, args.eval_tokens)}]
    before = {}
    for name in chosen:
        student, extra = variants[name]
        if str(student) not in before:
            before[str(student)] = ppl(str(student), texts, args.eval_tokens)
        if name.startswith("cache-") and not (work / name / "meta.json").exists():
            # the first `tokens` of the training plays: as many unique tokens as the live-teacher runs see
            taille("teacher-cache", "--teacher", TEACHER, "--data", "shakespeare", "--top-k", name.split("-")[1],
                   "--seq-len", args.seq_len, "--tokens", args.tokens, "--out", work / name)
        out = work / "runs" / name
        taille("distill", "--student", student, *common, *extra, "--out", out)
        record = json.loads((out / "taille.json").read_text())["distill"]
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        speeds = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
        rows.append({"variant": name, "before": before[str(student)], **ppl(str(out), texts, args.eval_tokens),
                     "final_loss": round(record["final_loss"], 4), "precision": record["precision"],
                     "tokens": record["tokens"], "tokens_per_s": round(sorted(speeds)[len(speeds) // 2], 1),
                     "metrics": str(out / "metrics.jsonl")})
        print(json.dumps(rows[-1]), flush=True)

    lines = ["| variant | plays ppl before -> after | WikiText-2 ppl before -> after | final train loss | precision | tokens/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["variant"] == "teacher":
            lines.append(f"| teacher | {r['plays']} | {r['wikitext2']} | - | - | - |")
        else:
            lines.append(f"| {r['variant']} | {r['before']['plays']} -> {r['plays']} | {r['before']['wikitext2']} -> "
                         f"{r['wikitext2']} | {r['final_loss']} | {r['precision']} | {r['tokens_per_s']} |")
    note = (f"Budget {args.tokens} tokens of shakespeare:train per run, seq {args.seq_len}, batch {args.batch_size}, "
            f"lr {args.lr} -> {args.lr / 10} cosine; perplexity on the first {args.eval_tokens:,} held-out tokens, "
            "window = stride = 1024.")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill_recovery.md").write_text("\n".join(lines) + "\n\n" + note + "\n")
    (RESULTS / "distill_recovery.json").write_text(json.dumps({"rows": rows, "settings": vars(args)}, indent=1) + "\n")
    plot(rows, RESULTS / "distill_recovery.png")
    print("\n".join(lines) + "\n\n" + note)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows[1:]:
        metrics = [json.loads(line) for line in Path(r["metrics"]).read_text().splitlines()]
        train = [m for m in metrics if "loss" in m]
        held = [m for m in metrics if "eval_ppl" in m]
        axes[0].plot([m["tokens"] for m in train], [m["loss"] for m in train], label=r["variant"])
        axes[1].plot([m["tokens"] for m in held], [m["eval_ppl"] for m in held], marker="o", label=r["variant"])
    axes[0].set(title="training loss (KD or CE)", xlabel="tokens")
    axes[1].set(title="held-out perplexity (plays)", xlabel="tokens", yscale="log")
    axes[1].axhline(rows[0]["plays"], color="gray", linestyle=":", label="teacher")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
