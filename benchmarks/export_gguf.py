"""The teacher and its 90M student on llama.cpp: file size, agreement with PyTorch, speed, per quantization.

For each model (SmolLM2-135M-Instruct, and a 90M width-pruned student of it) and each of f16, q8_0 and
q4_k_m, through the commands a user runs:
  taille export MODEL --quant Q --verify   size, top-1 agreement and mean KL against the PyTorch model on
                                           held-out plays, tokenizer and chat template checks
  taille bench FILE --json                 llama.cpp prefill and decode tokens/s (its own counters,
                                           median of --repeats), peak memory rise
Teacher and student are benchmarked back to back at each quantization, so the student's decode-speed
ratio over the teacher is measured side by side. Nothing else should run on the machine meanwhile.

Run:  .venv/bin/python benchmarks/export_gguf.py --student PATH [--repeats 5]
Writes benchmarks/results/export_gguf.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
QUANTS = ("f16", "q8_0", "q4_k_m")


def taille_json(*args) -> dict:
    out = subprocess.run([sys.executable, "-m", "taille", *map(str, args), "--json"], capture_output=True, text=True)
    if out.returncode not in (0, 3):  # 3: verification below its threshold, reported in the table
        sys.exit(f"taille {' '.join(map(str, args))} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--student", required=True, help="the 90M student (a `taille prune` or `distill` folder)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--decode", type=int, default=128)
    args = parser.parse_args()
    models = {"teacher": args.teacher, "student": args.student}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in QUANTS:
            for role, model in models.items():
                path = Path(tmp) / f"{role}-{quant}.gguf"
                record = taille_json("export", model, "--quant", quant, "--out", path, "--verify")
                speed = taille_json("bench", path, "--repeats", args.repeats, "--prompt", args.prompt,
                                    "--decode", args.decode)
                v = record["verify"]
                rows.append({
                    "model": role, "source": model, "quant": quant, "params": speed["params"],
                    "mib": round(record["bytes"] / 2**20, 1), "tensor_types": record["tensor_types"],
                    "top1_agreement": round(v["top1_agreement"], 4), "mean_kl": round(v["mean_kl"], 5),
                    "gates": v["gates"], "ppl_ratio": v["ppl_ratio"], "passed": v["passed"], "tokenizer_same": v["tokenizer_same"],
                    "ppl_pytorch": round(v["ppl_pytorch"], 2), "ppl_gguf": round(v["ppl_gguf"], 2),
                    "prefill_tok_s": round(speed["prefill_tok_s"], 1), "decode_tok_s": round(speed["decode_tok_s"], 1),
                    "memory_mib": round(speed["memory_rise_bytes"] / 2**20, 1), "threads": speed["threads"],
                })
                print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        if row["model"] == "student":
            teacher = next(r for r in rows if r["model"] == "teacher" and r["quant"] == row["quant"])
            row["decode_vs_teacher"] = round(row["decode_tok_s"] / teacher["decode_tok_s"], 2)
            row["prefill_vs_teacher"] = round(row["prefill_tok_s"] / teacher["prefill_tok_s"], 2)
    header = ["model", "quant", "params", "file MiB", "top-1 agreement", "mean KL", "ppl PyTorch / GGUF",
              "prefill tok/s", "decode tok/s", "student decode / teacher", "peak MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: (r["model"] != "teacher", QUANTS.index(r["quant"]))):
        gates = r["gates"] or {}
        limit = f" (limit {gates['max_mean_kl']})" if gates.get("max_mean_kl") else ""
        lines.append(" | ".join([
            f"| {r['model']}", r["quant"], f"{r['params'] / 1e6:.1f}M", f"{r['mib']}",
            f"{r['top1_agreement']:.2%}", f"{r['mean_kl']:.5f}{limit}", f"{r['ppl_pytorch']} / {r['ppl_gguf']}",
            f"{r['prefill_tok_s']}", f"{r['decode_tok_s']}", f"{r.get('decode_vs_teacher', '')}", f"{r['memory_mib']} |",
        ]))
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    settings = {"prompt": args.prompt, "decode": args.decode, "repeats": args.repeats, "models": models}
    (RESULTS / "export_gguf.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    (RESULTS / "export_gguf.md").write_text(
        f"# GGUF export on llama.cpp ({rows[0]['threads']} CPU threads)\n\n"
        f"Agreement: {args.teacher} and the student against their own PyTorch models, 1,016 next-token positions "
        f"of held-out plays. Speed: prompt {args.prompt} tokens, decode {args.decode}, median of {args.repeats}.\n\n"
        f"{table}\n")


if __name__ == "__main__":
    main()
