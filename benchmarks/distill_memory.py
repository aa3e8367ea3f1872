"""Distillation memory: the peak `taille plan --distill` plans (taille/distill/memory.py) against the peak of
the real loop, SmolLM2-135M-Instruct into its 90M width-pruned student, on this CPU.

Each configuration runs in a fresh process: `taille.distill.train.setup` loads the teacher, the student
and the data; one step warms up (AdamW's moments appear at its first update, as in every later step);
then the peak of --steps steps is measured two ways, one after the other:

  rss    the process's resident set, sampled every 2 ms by a thread, above its level after the imports and
         before the models load: everything the process holds besides tensors included (libraries' own
         memory, the tokenizer, the data, freed memory the C allocator keeps), which the plan does not
         count: the table shows the difference.
  torch  the most bytes of tensor storage alive at once (taille.distill.memory.live_bytes: every storage
         an op reads or returns, from its first sight to its release; the models' weights and the
         optimizer state registered before the steps). This is what the plan counts, and what
         torch.cuda.max_memory_allocated reports on a GPU. Slow (Python on every op), so it runs on its
         own steps, after the RSS ones.

Planned: the plan's single-process column (DDP on 1 GPU = no buckets) with --device cpu, at the same
batch, sequence length and precision. The student is pruned here first (8 calibration blocks: the
weights do not change the memory) unless --student names one.

Run:  .venv/bin/python benchmarks/distill_memory.py [--steps 2] [--only live-bf16-checkpointing]
Writes benchmarks/results/distill_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# name -> (precision, batch size, seq len, teacher cache top-K or None, activation checkpointing)
CONFIGS = {
    "live-bf16": ("bf16-mixed", 8, 256, None, False),
    "live-fp32": ("fp32", 4, 512, None, False),
    "cache-bf16": ("bf16-mixed", 8, 256, 128, False),
    "live-bf16-checkpointing": ("bf16-mixed", 8, 256, None, True),
}


# --- measuring, inside one process ------------------------------------------------------------------


def rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """The largest resident set seen by a thread sampling every 2 ms while active."""

    def __enter__(self):
        self.peak, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure(args) -> dict:
    """One configuration, in this process: setup, a warm-up step, then the measured steps."""
    import torch

    from taille.distill.config import DistillConfig, LossConfig
    from taille.distill.memory import live_bytes
    from taille.distill.train import setup, train_step

    baseline = rss_bytes()  # imports done, nothing loaded
    precision, batch, seq, top_k, checkpointing = CONFIGS[args.config]
    cfg = DistillConfig(student=args.student, out=str(Path(tempfile.mkdtemp(prefix="taille-mem-")) / "run"),
                        data=None if top_k else args.data, teacher=None if top_k else args.teacher,
                        teacher_cache=args.cache if top_k else None, eval_data=None, tokens=10**9, seq_len=seq,
                        batch_size=batch, lr=1e-5, min_lr=1e-6, warmup=1, loss=LossConfig(), precision=precision,
                        progress=False, activation_checkpointing=checkpointing)
    run = setup(cfg)
    train_step(run, 0)  # AdamW's moments are created here
    rss_ready = rss_bytes()
    tracker = live_bytes()
    static = {"student": list(run.trunk.parameters()), "teacher": list(run.teacher.parameters()) if run.teacher else [],
              "optimizer": [t for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]}
    for tensors in static.values():
        for t in tensors:
            tracker.register(t)
    registered = tracker.now
    with RssPeak() as rss:
        for step in range(1, args.steps + 1):
            float(train_step(run, step)["loss"])  # the loss is read every step, as the loop does
    with tracker:
        for step in range(args.steps + 1, 2 * args.steps + 1):
            float(train_step(run, step)["loss"])
    return {"config": args.config, "precision": run.precision, "batch_size": batch, "seq_len": seq, "top_k": top_k,
            "activation_checkpointing": checkpointing,
            "steps": args.steps, "torch_peak": tracker.peak, "torch_static": registered,
            "static": {k: sum(t.untyped_storage().nbytes() for t in v) for k, v in static.items()},
            "rss_peak_rise": rss.peak - baseline, "rss_baseline": baseline,
            "rss_beyond_tensors": rss_ready - baseline - registered}  # at rest before the steps


# --- the comparison, in the parent ------------------------------------------------------------------


def student_folder(teacher: str, work: Path) -> str:
    """The teacher width-pruned to 90M (hidden 480, MLP 1152, 6/3 heads), as the demo recipe does."""
    out = work / "student-90m"
    if not (out / "config.json").is_file():
        from taille.prune.config import PruneConfig, Target
        from taille.prune.prune import run_prune

        run_prune(PruneConfig(model=teacher, out=str(out), target=Target(params="90M", axes=("mlp", "hidden", "heads")),
                              data="shakespeare", samples=8, seq_len=128))
    return str(out)


def cache_folder(teacher: str, work: Path, seq_len: int, top_k: int) -> str:
    out = work / f"cache-{seq_len}-k{top_k}"
    if not (out / "meta.json").is_file():
        from taille.distill.cache import build_cache
        from taille.models.load import load_model

        model, tokenizer = load_model(teacher, dtype="fp32", device="cpu")
        build_cache(model, tokenizer, "shakespeare", out, top_k, seq_len, max_tokens=64 * seq_len, batch_size=8,
                    progress=False)
    return str(out)


def planned(teacher: str, student: str, name: str) -> dict:
    from taille.distill.memory import DistillMemorySettings, per_gpu, resolve

    precision, batch, seq, top_k, checkpointing = CONFIGS[name]
    cfg = DistillMemorySettings(student=student, gpus=1, batch_size=batch, seq_len=seq, grad_accum=1,
                                precision=precision, device="cpu", top_k=top_k or 128,
                                activation_checkpointing=checkpointing)
    t, s, cfg = resolve(teacher, cfg)
    column = per_gpu(s, t, cfg, "ddp-cache" if top_k else "ddp", 1)  # one process: no DDP, no buckets
    shape = f"hidden {s.hidden}, MLP {s.ffn}, {s.heads}/{s.kv_heads} heads, {s.layers} layers, {s.params:,} parameters"
    return {**column.to_dict(), "student_shape": shape}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--student", default=None, help="default: the teacher pruned to 90M here")
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", default=None, help="rerun one of " + ", ".join(CONFIGS) + " and replace its row")
    parser.add_argument("--config", help=argparse.SUPPRESS)  # the child process's configuration
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        print("RESULT " + json.dumps(measure(args)))
        return

    work = Path(tempfile.gettempdir()) / "taille-distill-memory"
    work.mkdir(exist_ok=True)
    student = args.student or student_folder(args.teacher, work)
    rows = []
    for name in [args.only] if args.only else CONFIGS:
        precision, batch, seq, top_k, _ = CONFIGS[name]
        extra = ["--cache", cache_folder(args.teacher, work, seq, top_k)] if top_k else []
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--config", name, "--teacher", args.teacher, "--student", student,
                               "--data", args.data, "--steps", str(args.steps), *extra], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(line[len("RESULT "):])
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["plan"] = planned(args.teacher, student, name)
        result["student"] = f"{student} ({result['plan'].pop('student_shape')})"
        rows.append(result)
        print(f"{name}: planned {result['plan']['peak'] / 2**20:,.0f} MiB, torch {result['torch_peak'] / 2**20:,.0f} MiB, "
              f"RSS rise {result['rss_peak_rise'] / 2**20:,.0f} MiB ({result['seconds']} s)", flush=True)
    if args.only and (RESULTS / "distill_memory.json").is_file():  # the other rows stay as they were measured
        kept = [r for r in json.loads((RESULTS / "distill_memory.json").read_text()) if r["config"] != args.only]
        rows = sorted(kept + rows, key=lambda r: list(CONFIGS).index(r["config"]))
    write(rows, args)


def torch_version() -> str:
    import torch

    return torch.__version__


def write(rows: list[dict], args) -> None:
    import platform

    MiB = 2**20
    header = ["run", "precision", "batch x seq", "planned peak (MiB)", "measured, torch (MiB)", "planned / torch",
              "within 15%", "measured, RSS rise (MiB)", "planned / RSS", "RSS rise - torch (MiB)"]
    table = [[r["config"], r["precision"], f"{r['batch_size']} x {r['seq_len']}", f"{r['plan']['peak'] / MiB:,.0f}",
              f"{r['torch_peak'] / MiB:,.0f}", f"{r['plan']['peak'] / r['torch_peak']:.3f}",
              "yes" if abs(r["plan"]["peak"] / r["torch_peak"] - 1) <= 0.15 else "NO",
              f"{r['rss_peak_rise'] / MiB:,.0f}", f"{r['plan']['peak'] / r['rss_peak_rise']:.3f}",
              f"{(r['rss_peak_rise'] - r['torch_peak']) / MiB:,.0f}"] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(t) + " |" for t in table]
    shown = [p for p in rows[0]["plan"]["parts"] if any(r["plan"]["parts"][p] for r in rows)]
    parts = ["", "Planned parts at the peak (MiB):", "", "| run | moment | " + " | ".join(shown) + " |",
             "|" + "---|" * (len(shown) + 2)]
    parts += [f"| {r['config']} | {r['plan']['moment']} | " + " | ".join(f"{r['plan']['parts'][p] / MiB:,.0f}" for p in shown)
              + " |" for r in rows]
    measured_static = ["", "Measured before the steps (MiB): " + "; ".join(
        f"{r['config']}: student {r['static']['student'] / MiB:,.0f}, teacher {r['static']['teacher'] / MiB:,.0f}, "
        f"AdamW {r['static']['optimizer'] / MiB:,.0f}" for r in rows)]
    text = "\n".join([f"# Distillation memory: planned vs measured ({platform.machine()}, {os.cpu_count()} cores, "
                      f"torch {torch_version()}; {args.steps} steps measured each way after one warm-up step)", "",
                      f"Teacher {args.teacher}, student {rows[0]['student']}.", "", *lines, *parts, *measured_static, ""])
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill_memory.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "distill_memory.md").write_text(text)


if __name__ == "__main__":
    main()
