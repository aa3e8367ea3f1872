"""Prune the embedded SmolLM2-135M-Instruct to ~90M with every criterion, and compare perplexities.

One importance pass (128 calibration blocks x 512 tokens from the Shakespeare calibration plays, plus the
held-out loss without each layer) serves every variant:
  width   activation / magnitude / random   hidden 480, MLP 1152, 6/3 heads, 30 layers (search, --axes mlp,hidden,heads)
  depth   block-importance / ppl            12 layers dropped, MLP trimmed to land within 1% of 90M
Each output is saved, reloaded by stock transformers in a fresh process, and compared with the in-memory
model's logits. Then the teacher and every student are scored on WikiText-2 and the held-out plays.

Run:  .venv/bin/python benchmarks/prune_smollm2.py --wikitext2 PATH/wiki.test.raw [--max-tokens 131072]
Writes benchmarks/results/prune_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
TARGET = 90_000_000


def depth_shape(config, layers: int):
    """`layers` layers, MLP trimmed (multiple of 64) to the width closest to TARGET."""
    from taille.prune.shape import Shape, count_params, shape_of

    base = shape_of(config)
    options = [Shape(base.hidden, f, base.heads, base.kv_heads, layers) for f in range(64, base.ffn + 1, 64)]
    return min(options, key=lambda s: abs(count_params(config, s) - TARGET))


def reload_max_diff(folder: Path, model, work: Path) -> float:
    """Max |logit difference| between the in-memory model and the folder loaded by stock transformers."""
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, work / "expected.pt")
    code = ("import torch; from transformers import AutoModelForCausalLM\n"
            f"e = torch.load({str(work / 'expected.pt')!r})\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.float32)\n"
            "with torch.no_grad(): print(float((m(e['ids']).logits - e['logits']).abs().max()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wikitext2", required=True, help="path to wiki.test.raw")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--depth-samples", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=131072, help="tokens of each text to score")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--work", default=None, help="where pruned checkpoints go (default: a temp folder)")
    args = parser.parse_args()

    from taille.data.tokens import load_tokens
    from taille.eval.ppl import perplexity
    from taille.models.load import load_model
    from taille.models.precision import resolve_precision
    from taille.prune.figures import plot_importance
    from taille.prune.importance import magnitude_importance, random_importance, save_importance
    from taille.prune.prune import Calibration, compute_importance, prune_, save_pruned
    from taille.prune.shape import search_shape

    work = Path(args.work or tempfile.mkdtemp(prefix="taille-prune-"))
    precision = resolve_precision(args.precision, "cpu")
    teacher, tokenizer = load_model("smollm2-135m-instruct", dtype="fp32", device="cpu")
    cal = Calibration("shakespeare", args.samples, args.seq_len, 8, args.depth_samples)
    start = time.perf_counter()
    scores = compute_importance(teacher, tokenizer, cal, "activation", depth_metric="ppl", precision=precision)
    importance_s = time.perf_counter() - start
    save_importance(scores, RESULTS / "prune_smollm2_importance", teacher.config)
    plot_importance(scores, RESULTS / "prune_smollm2_importance")

    width = search_shape(teacher.config, TARGET, ("mlp", "hidden", "heads"))
    depth = depth_shape(teacher.config, 18)
    variants = {
        "width / activation": (scores, width, "block-importance"),
        "width / magnitude": (magnitude_importance(teacher), width, "block-importance"),
        "width / random": (random_importance(teacher.config, seed=0), width, "block-importance"),
        "depth / block-importance": (scores, depth, "block-importance"),
        "depth / ppl": (scores, depth, "ppl"),
    }
    texts = {"wikitext2": f"wikitext2:{args.wikitext2}", "plays (held-out)": "shakespeare:heldout"}
    streams = {name: load_tokens(spec, tokenizer, split="heldout", max_tokens=args.max_tokens) for name, spec in texts.items()}

    def score(model) -> dict:
        return {name: round(perplexity(model, s.tokens, window=args.window, precision=precision, progress=False).ppl, 3)
                for name, s in streams.items()}

    rows = [{"model": "teacher (SmolLM2-135M-Instruct)", "params": sum(p.numel() for p in teacher.parameters()),
             "shape": "576 / 1536 / 9:3 / 30", **score(teacher)}]
    for name, (variant_scores, shape, depth_criterion) in variants.items():
        student = copy.deepcopy(teacher)
        record = prune_(student, variant_scores, shape, depth_criterion=depth_criterion)
        folder = save_pruned(student, tokenizer, work / name.replace(" / ", "-"), record)
        diff = reload_max_diff(folder, student, work)
        s = record["shape_after"]
        rows.append({"model": name, "params": record["params_after"],
                     "shape": f"{s['hidden']} / {s['ffn']} / {s['heads']}:{s['kv_heads']} / {s['layers']}",
                     "dropped_layers": sorted(set(range(30)) - set(record["kept"]["layers"])),
                     "reload_max_abs_diff": diff, **score(student)})
        print(json.dumps(rows[-1]), flush=True)
        del student

    header = "| model | params | hidden / MLP / heads:kv / layers | WikiText-2 ppl | plays ppl | reload max abs diff |"
    lines = [header, "|---|---|---|---|---|---|"] + [
        f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['shape']} | {r['wikitext2']} | {r['plays (held-out)']} | "
        f"{r.get('reload_max_abs_diff', '-')} |" for r in rows]
    settings = (f"Calibration: {scores.meta['samples']} blocks x {args.seq_len} tokens of shakespeare:calib "
                f"(+{scores.meta.get('depth_samples')} held-apart blocks for the depth loss); importance took "
                f"{importance_s:.0f} s. Perplexity: first {args.max_tokens:,} tokens of each text, window = stride = "
                f"{args.window}, precision {precision}, no fine-tuning after pruning.")
    table = "\n".join(lines)
    print(table + "\n\n" + settings)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune_smollm2.md").write_text(table + "\n\n" + settings + "\n")
    (RESULTS / "prune_smollm2.json").write_text(json.dumps(
        {"rows": rows, "settings": vars(args) | {"precision": precision, "importance_seconds": round(importance_s, 1),
                                                 "layers_by_loss": [int(i) for i in torch.argsort(scores.layer_loss)]}},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
