"""How much of what pruning lost does distillation win back, and what does each choice cost?

SmolLM2-135M-Instruct is pruned to 90M by the width recipe (hidden 480, MLP 1152, 6/3 heads; activation
scores on 128 x 512 calibration tokens), then trained for the same token budget on the Shakespeare
training plays by every variant below, each through the `taille distill` command a user runs:
  kd             forward KL from the live teacher, bf16-mixed (the default)
  kd-fp32        the same in fp32 (same loss within noise? tokens/s of each)
  kd-seed1       kd with another seed (another order of the same blocks): the run-to-run noise that the
                 fp32 and the cache rows are read against
  ce             cross-entropy fine-tuning of the same pruned student (no teacher)
  scratch-kd     the same shape from random init, distilled
  depth-kd       the depth-pruned student (block importance, 18 layers + MLP 1472), distilled
  cache-K        forward KL from a top-K teacher cache, K in --cache-k (one teacher pass at the largest K,
                 the others cut from it with `teacher-cache --from`)
  cache-128-seed1  cache-128 with another seed: is its dip below cache-32 the K or the run?
Held-out perplexity (plays and WikiText-2) before and after, final loss, tokens/s; curves in one PNG.

Run:  .venv/bin/python benchmarks/distill_recovery.py --wikitext2 PATH/wiki.test.raw [--tokens 512K]
Writes benchmarks/results/distill_recovery.{json,md,png} from whatever has finished, after every run. Alone on
the 2-core CPU these rows were first run on, 512K tokens took ~21 minutes a bf16-mixed live-teacher run (~420 tokens/s), ~15 from a
teacher cache, ~50 in fp32 (~165 tokens/s); on the 2-core AVX512-BF16 EPYC of later sessions the live-teacher
run takes ~40 (~210 tokens/s, recovery_general.json); all variants take hours, so each finished step is kept in the work
folder, rows already in the committed JSON count as done, and the command run again goes on from there (an
interrupted distillation resumes exactly from its last checkpoint, every 25 steps).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
CURVES = RESULTS / "distill_recovery_curves"  # each finished run's metrics.jsonl, so the PNG does not need the work folder
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


def pruned_students(work: Path) -> tuple[Path, Path]:
    """The 90M width student and the 90M depth student of the teacher (made once, kept in `work`)."""
    width, depth = work / "width-90m", work / "depth-90m"
    if not (work / "importance" / "importance.json").exists() and not (
            (width / "taille.json").exists() and (depth / "taille.json").exists()):
        taille("importance", "-m", TEACHER, "--data", "shakespeare", "--samples", 128, "--out", work / "importance")
    if not (width / "taille.json").exists():
        taille("prune", "-m", TEACHER, "--scores", work / "importance", "--params", "90M", "--axes",
               "mlp,hidden,heads", "--out", width)
    if not (depth / "taille.json").exists():
        taille("prune", "-m", TEACHER, "--scores", work / "importance", "--layers", 18, "--ffn", 1472,
               "--out", depth)
    return width, depth


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """The training budget and schedule every compared run shares."""
    parser.add_argument("--tokens", default="512K")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-tokens", type=int, default=65536)


def train_args(args, data: str = "shakespeare") -> list:
    """`taille distill` options of one compared run; the held-out curve is always the plays'."""
    return ["--data", data, "--tokens", args.tokens, "--seq-len", args.seq_len, "--batch-size", args.batch_size,
            "--lr", args.lr, "--min-lr", args.lr / 10, "--warmup", 10, "--eval-every", 50,
            "--eval-data", "shakespeare:heldout", "--eval-tokens", 16384, "--save-every", 25]


VARIANT_ORDER = ("kd", "ce", "depth-kd", "scratch-kd", "cache-32", "cache-128", "cache-512", "kd-fp32", "kd-seed1",
                 "cache-128-seed1")
SEED_REPEATS = ("kd", "cache-128")  # run again with --seed 1 (the default is 1234): the noise between two runs


def done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def remember(path: Path, compute) -> dict:
    """Results are kept in the work folder as they come, so a stopped benchmark goes on where it was."""
    if (cached := done(path)) is not None:
        return cached
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))
    return value


def weights_stamp(folder: Path) -> str:
    """Changes whenever the model folder's weights do (a model measured under a fixed name, such as a
    `make demo` student run again, is measured again): taille's own stamp, which `taille prefer` keys on."""
    from taille.models.load import weights_stamp as stamp

    return stamp(str(folder)) or sys.exit(f"{folder}: no safetensors weights there (give a distilled student's "
                                          "folder, e.g. runs/demo/distilled)")


def run_summary(out: Path, name: str | None = None) -> dict:
    """Final numbers of one finished run: the mean training loss of its last tenth (one step's loss is
    noisy), the last held-out evaluation, the median logged tokens/s. With a `name`, the run's metrics are
    copied into the results folder and the row points there."""
    metrics_file, text = out / "metrics.jsonl", (out / "metrics.jsonl").read_text()
    if name is not None:
        CURVES.mkdir(parents=True, exist_ok=True)
        metrics_file = CURVES / f"{name}.metrics.jsonl"
        metrics_file.write_text(text)
    record = json.loads((out / "taille.json").read_text())["distill"]
    metrics = [json.loads(line) for line in text.splitlines()]
    train = [m for m in metrics if "loss" in m]
    tail = train[-max(1, len(train) // 10):]
    speeds = sorted(m["tokens_per_s"] for m in train)
    held = ([m for m in metrics if "eval_loss" in m] or [{}])[-1]  # {}: a run without held-out data
    return {"final_loss": round(sum(m["loss_avg"] for m in tail) / len(tail), 4),
            "eval_loss": round(held["eval_loss"], 4) if held else None,
            "eval_kl": round(held["eval_kl"], 4) if "eval_kl" in held else None,  # None: a run without a teacher
            "precision": record["precision"], "tokens": record["tokens"], "seconds": record["seconds"],
            "tokens_per_s": round(speeds[len(speeds) // 2], 1), "metrics": repo_relative(metrics_file)}


def repo_relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def adopt_committed_rows(work: Path, settings: dict) -> None:
    """Rows in the committed results of the same settings count as finished (a new machine has no work folder;
    each row costs up to half an hour of CPU). To measure a row again, delete it here and in the work folder."""
    committed = done(RESULTS / "distill_recovery.json")
    if not committed:
        return
    same = {k: v for k, v in committed["settings"].items() if k not in ("only", "work")}
    if same != settings:
        return
    for row in committed["rows"]:
        path = work / "rows" / f"{row['variant']}.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(row, indent=1))
            print(f"kept from {RESULTS / 'distill_recovery.json'}: {row['variant']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wikitext2", required=True)
    add_train_options(parser)
    parser.add_argument("--cache-k", default="32,128,512")
    parser.add_argument("--only", default=None, help="comma-separated variants to run (default: all, in order)")
    parser.add_argument("--work", default=None, help="work folder (default: TAILLE_CACHE/bench/distill_recovery); "
                        "finished steps there are not redone, an interrupted run resumes from its checkpoint")
    args = parser.parse_args()

    from taille.paths import cache_dir

    work = Path(args.work) if args.work else cache_dir("bench") / "distill_recovery"
    work.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("only", "work")}
    if (old := done(work / "settings.json")) and old != settings:
        sys.exit(f"{work} holds results of other settings ({old}); give another --work")
    (work / "settings.json").write_text(json.dumps(settings, indent=1))
    adopt_committed_rows(work, settings)
    texts = {"plays": "shakespeare:heldout", "wikitext2": f"wikitext2:{args.wikitext2}"}
    width, depth = pruned_students(work)
    scratch = work / "scratch-90m"
    if not (scratch / "config.json").exists():
        random_init(scratch, width)
    common = train_args(args)
    variants = {
        "kd": (width, ["--teacher", TEACHER]),
        "kd-fp32": (width, ["--teacher", TEACHER, "--precision", "fp32"]),
        "ce": (width, ["--ce-weight", 1.0, "--kd-weight", 0.0]),
        "scratch-kd": (scratch, ["--teacher", TEACHER]),
        "depth-kd": (depth, ["--teacher", TEACHER]),
    }
    cache_ks = [int(k) for k in args.cache_k.split(",") if k]
    for k in cache_ks:
        variants[f"cache-{k}"] = (width, ["--teacher-cache", work / f"cache-{k}"])
    for name in SEED_REPEATS:
        if name in variants:
            student, extra = variants[name]
            variants[f"{name}-seed1"] = (student, [*extra, "--seed", 1])
    order = [v for v in VARIANT_ORDER if v in variants] + [v for v in variants if v not in VARIANT_ORDER]
    chosen = args.only.split(",") if args.only else order

    teacher_row = remember(work / "rows" / "teacher.json",
                           lambda: {"variant": "teacher", **ppl(TEACHER, texts, args.eval_tokens)})
    def finished_rows() -> list[dict]:
        return [teacher_row] + [r for v in order if (r := done(work / "rows" / f"{v}.json"))]

    def tables() -> None:
        write_tables(finished_rows(), args, [v for v in order if not (work / "rows" / f"{v}.json").exists()])

    for name in chosen:
        if (work / "rows" / f"{name}.json").exists():
            continue
        student, extra = variants[name]
        before = remember(work / "before" / f"{student.name}.json", lambda: ppl(str(student), texts, args.eval_tokens))
        check_same_student(name, before, finished_rows(), variants)
        if name.startswith("cache-") and not (work / name / "meta.json").exists():
            # one teacher pass, at the largest K, over the first `tokens` of the training plays (as many unique
            # tokens as the live-teacher runs see); the smaller K are cut out of it
            largest = work / f"cache-{max(cache_ks)}"
            if not (largest / "meta.json").exists():
                taille("teacher-cache", "--teacher", TEACHER, "--data", "shakespeare", "--top-k", max(cache_ks),
                       "--seq-len", args.seq_len, "--tokens", args.tokens, "--out", largest)
            if largest != work / name:
                taille("teacher-cache", "--from", largest, "--top-k", name.split("-")[1], "--out", work / name)
        out = work / "runs" / name
        if not (out / "taille.json").exists():
            taille("distill", "--student", student, *common, *extra, "--out", out, "--resume")
        row = remember(work / "rows" / f"{name}.json", lambda: {"variant": name, "before": before,
                                                               **ppl(str(out), texts, args.eval_tokens),
                                                               **run_summary(out, name)})
        print(json.dumps(row), flush=True)
        tables()  # after every run: a benchmark stopped half-way still leaves what it measured
    tables()


# How far a remade student's perplexity may stray before it counts as another student: bf16 kernels differ
# between machines (the teacher scored 31.165 on the plays on one and 31.153 on the next), and a pruned
# student at perplexity ~640 amplifies that; another choice of channels moves it by far more.
SAME_STUDENT_RTOL = 0.01


def near(a: dict, b: dict) -> bool:
    """Two before-training perplexities {text: ppl} close enough to be one student's."""
    return all(abs(a[k] - b[k]) <= SAME_STUDENT_RTOL * b[k] for k in a)


def check_same_student(name: str, before: dict, rows: list[dict], variants: dict) -> None:
    """A student made again (a new machine) must be the one the finished rows trained: the same perplexity
    before training, within SAME_STUDENT_RTOL."""
    student = variants[name][0]
    for r in rows:
        if r["variant"] not in variants or variants[r["variant"]][0] != student:
            continue
        if not near(before, r["before"]):
            sys.exit(f"{student} scores {before} before training, but the finished row {r['variant']} started from "
                     f"{r['before']}: the student is not the same; give another --work or run every variant again")
        if before != r["before"]:
            print(f"{student} scores {before} before training here, {r['before']} where {r['variant']} ran: "
                  f"within {SAME_STUDENT_RTOL:.0%}, taken as the same student", flush=True)


def kl_text(kl) -> str:
    return "-" if kl is None or kl != kl else str(kl)  # older rows hold NaN for "no teacher"


def write_tables(rows: list[dict], args, missing: list[str]) -> None:
    lines = ["| variant | plays ppl before -> after | WikiText-2 ppl before -> after | train loss (last 10%) | "
             "held-out loss / KL to teacher | precision | tokens/s | minutes at that speed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["variant"] == "teacher":
            lines.append(f"| teacher | {r['plays']} | {r['wikitext2']} | - | - | - | - | - |")
        else:
            lines.append(f"| {r['variant']} | {r['before']['plays']} -> {r['plays']} | {r['before']['wikitext2']} -> "
                         f"{r['wikitext2']} | {r['final_loss']} | {r['eval_loss']} / {kl_text(r['eval_kl'])} | "
                         f"{r['precision']} | {r['tokens_per_s']} | {r['tokens'] / r['tokens_per_s'] / 60:.1f} |")
    note = (f"Budget {args.tokens} tokens of shakespeare:train per run, seq {args.seq_len}, batch {args.batch_size}, "
            f"lr {args.lr} -> {args.lr / 10} cosine, 10 warm-up steps; perplexity on the first {args.eval_tokens:,} "
            "held-out tokens, window = stride = 1024. The train loss is each run's own objective (KD: forward KL; "
            "ce: cross-entropy; cache-K: KL to the top-K teacher with the rest folded into one bucket), so compare "
            "it only within a kind; the held-out KL is to the full teacher (- for a run without one). tokens/s is the "
            "median of the logged intervals (a run paused or sharing the CPU for a while keeps its own pace), minutes "
            "the budget at that speed; wall time with pauses is in the JSON (`seconds`). The teacher cache holds the "
            "first of the training plays' tokens in text order (one block per sample of a run); the live-teacher runs "
            "draw as many random blocks from all of them.")
    if missing:
        note += " Not run yet: " + ", ".join(missing) + "."
    befores = [r["before"] for r in rows[1:]]
    if any(a != b and near(a, b) for a in befores for b in befores):
        note += (" The width student was made again on a later machine: its perplexity before training differs by "
                 f"less than {SAME_STUDENT_RTOL:.0%} between rows (bf16 kernels differ between machines; the teacher "
                 "scored 31.165 on the plays on the first and 31.153 on the next).")
    if no_curve := [r["variant"] for r in rows[1:] if not curve_file(r).is_file()]:
        note += (" Not in the PNG: " + ", ".join(no_curve) + " (their metrics.jsonl stayed in the work folder of a "
                 "machine that is gone; the rows are theirs, the curves need the runs again).")
    if compared := [compare(by[a], by[b]) for a, b in PAIRS if a in (by := {r["variant"]: r for r in rows}) and b in by]:
        note += (" Side by side (first minus second; the per-step gap compares the training loss at the same logged "
                 "steps, the same batches when only the precision differs): " + "; ".join(compared) + ".")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill_recovery.md").write_text("\n".join(lines) + "\n\n" + note + "\n")
    rows = [{**r, "eval_kl": None} if kl_text(r.get("eval_kl")) == "-" and "eval_kl" in r else r for r in rows]
    (RESULTS / "distill_recovery.json").write_text(json.dumps({"rows": rows, "settings": vars(args)}, indent=1) + "\n")
    plot(rows, RESULTS / "distill_recovery.png")
    print("\n".join(lines) + "\n\n" + note)


# (run, the run it is read against): precision at the same seed, then the same run at another seed, which is
# the noise a difference has to stand out of
PAIRS = (("kd-fp32", "kd"), ("kd-seed1", "kd"), ("cache-128-seed1", "cache-128"))


def compare(a: dict, b: dict) -> str:
    gap = ""
    if curve_file(a).is_file() and curve_file(b).is_file():
        losses = [{m["step"]: m["loss"] for m in curve(r) if "loss" in m} for r in (a, b)]
        steps = sorted(losses[0].keys() & losses[1].keys())
        gap = f", per-step |gap| {sum(abs(losses[0][t] - losses[1][t]) for t in steps) / len(steps):.4f} mean"
    return (f"{a['variant']} vs {b['variant']}: train loss {a['final_loss'] - b['final_loss']:+.4f}, held-out loss "
            f"{a['eval_loss'] - b['eval_loss']:+.4f}, plays ppl {a['plays'] - b['plays']:+.2f}, WikiText-2 ppl "
            f"{a['wikitext2'] - b['wikitext2']:+.2f}{gap}, tokens/s x{a['tokens_per_s'] / b['tokens_per_s']:.2f}")


def curve_file(row: dict) -> Path:
    return ROOT / row["metrics"]  # an absolute path stays itself


def curve(row: dict) -> list[dict]:
    """A finished run's logged metrics (train steps and held-out evaluations)."""
    return [json.loads(line) for line in curve_file(row).read_text().splitlines()]


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, r in enumerate(rows[1:]):
        if not curve_file(r).is_file():
            continue
        style = {"label": r["variant"], "color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--"}  # one look per run in every panel
        metrics = curve(r)
        train = [m for m in metrics if "loss" in m]
        held = [m for m in metrics if "eval_ppl" in m]
        axes[0].plot([m["tokens"] for m in train], [m["loss"] for m in train], **style)
        axes[1].plot([m["tokens"] for m in held], [m["eval_ppl"] for m in held], marker="o", **style)
        if held and "eval_kl" in held[0]:
            axes[2].plot([m["tokens"] for m in held], [m["eval_kl"] for m in held], marker="o", **style)
    # the runs' own held-out evaluation (--eval-tokens 16384 at the training length), not the table's
    # 65K-token, 1024-window protocol: its numbers are higher, and the teacher was not scored on it
    axes[0].set(title="training loss (each run's own objective)", xlabel="tokens", yscale="log")
    axes[1].set(title="held-out perplexity during training\n(plays, 16K tokens, seq 256)", xlabel="tokens", yscale="log")
    axes[2].set(title="held-out KL to the teacher during training\n(plays, 16K tokens, seq 256)", xlabel="tokens",
                yscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
