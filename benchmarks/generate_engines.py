"""Which engine samples a corpus from the embedded teacher faster here: batched PyTorch or llama.cpp?

Both run `taille generate` on SmolLM2-135M-Instruct (the same weights: PyTorch reads the GGUF dequantized,
llama.cpp runs the GGUF itself) with the same seed prompts, budget and sampling, one after the other.
Generation tokens/s is what each run's OUT.meta.json records (tokens sampled / seconds inside the engine).

Run:  .venv/bin/python benchmarks/generate_engines.py [--tokens 4000] [--batch-sizes 16,64]
Writes benchmarks/results/generate_engines.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", default="4000")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="16,64", help="PyTorch batch sizes to try")
    args = parser.parse_args()
    runs = [("torch", int(b)) for b in args.batch_sizes.split(",")] + [("llama.cpp", 1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine, batch in runs:
            out = Path(tmp) / f"{engine}-{batch}.jsonl"
            subprocess.run([sys.executable, "-m", "taille", "generate", "--teacher", args.teacher, "--out", str(out),
                            "--tokens", args.tokens, "--max-new-tokens", str(args.max_new_tokens),
                            "--batch-size", str(batch), "--engine", engine], check=True)
            meta = json.loads(Path(f"{out}.meta.json").read_text())
            rows.append({"engine": meta["engine"], "batch": batch, "tokens_per_s": meta["generation_tokens_per_s"],
                         "generated": meta["generated_tokens_this_run"], "kept": meta["tokens_kept"],
                         "duplicate_rate": meta["duplicate_rate_this_run"], "filtered": meta["filtered_this_run"]})
    fastest = max(r["tokens_per_s"] for r in rows)
    lines = ["| engine | batch | generated tokens/s | vs fastest | tokens generated | kept | duplicate rate |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['batch']} | {r['tokens_per_s']} | {r['tokens_per_s'] / fastest:.2f}x | {r['generated']} | "
              f"{r['kept']} | {r['duplicate_rate']} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generate_engines.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    (RESULTS / "generate_engines.md").write_text(
        f"# taille generate: engines on {args.teacher}\n\nBudget {args.tokens} kept answer tokens per run, answers "
        f"up to {args.max_new_tokens} tokens, temperature 0.8, top-p 0.95; runs one after the other.\n\n{table}\n")


if __name__ == "__main__":
    main()
