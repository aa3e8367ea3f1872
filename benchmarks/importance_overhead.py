"""What importance estimation costs over plain forward passes on the same calibration blocks.

Each measurement runs in its own process (fresh peak-memory counter, same model load):
  forward      model(ids): the full forward users run, LM head and logits included
  base         the decoder stack only (no LM head): the strictest baseline, as importance skips the head
  importance   activation_importance (hooks + block importance of every contiguous block)
Peak memory is the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its
RSS after loading. Time is wall-clock over the whole pass. Ratios are against `forward` and `base`.

Run:  .venv/bin/python benchmarks/importance_overhead.py [--blocks 32 --seq-len 512 --batch-size 8]
Writes benchmarks/results/importance_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def child(mode: str, args) -> None:
    import torch

    from taille.data.tokens import batches, load_tokens
    from taille.eval.speed import peak_memory, reset_peak_memory
    from taille.models.load import load_model
    from taille.models.precision import autocast
    from taille.prune.importance import activation_importance

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, dtype="fp32", device="cpu")
    blocks = load_tokens("shakespeare", tokenizer, split="calib", progress=False).blocks(args.seq_len)[: args.blocks]
    before = reset_peak_memory(torch.device("cpu"))  # peak RSS := current RSS
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "importance":
            activation_importance(model, blocks, args.batch_size, args.precision, progress=False)
        else:
            run = model if mode == "forward" else model.model
            for ids in batches(blocks, args.batch_size):
                with autocast(args.precision, "cpu"):
                    run(input_ids=ids, use_cache=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_bytes": peak_memory(torch.device("cpu")) - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args)

    results = {}
    for repeat in range(args.repeats):  # interleaved, so drift in machine load hits every mode alike
        for mode in ("forward", "base", "importance"):
            cmd = [sys.executable, __file__, "--child", mode] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "repeats")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            best = results.get(mode)
            results[mode] = {"seconds": min(r["seconds"], best["seconds"]) if best else r["seconds"],
                             "peak_bytes": max(r["peak_bytes"], best["peak_bytes"]) if best else r["peak_bytes"]}
    imp = results["importance"]
    table = ["| baseline | time ratio (importance / baseline) | peak memory ratio |", "|---|---|---|"]
    for base in ("forward", "base"):
        results[f"ratio_vs_{base}"] = {"time": round(imp["seconds"] / results[base]["seconds"], 3),
                                       "memory": round(imp["peak_bytes"] / results[base]["peak_bytes"], 3)}
        table.append(f"| {base} | {results[f'ratio_vs_{base}']['time']} | {results[f'ratio_vs_{base}']['memory']} |")
    detail = "\n".join(f"{m}: {results[m]['seconds']:.2f} s, peak +{results[m]['peak_bytes'] / 2**20:.0f} MiB"
                       for m in ("forward", "base", "importance"))
    print("\n".join(table) + "\n\n" + detail)
    out = Path(__file__).parent / "results" / "importance_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "child"}, **results},
                              indent=1) + "\n")


if __name__ == "__main__":
    main()
