"""Distillation throughput: `taille distill` against TRL's GKD trainer and a plain Hugging Face Trainer.

The same teacher and student, the same token blocks, batch, sequence length and loss (forward KL at
temperature 1 over every position), AdamW, gradient clipping, no gradient checkpointing, no evaluation
or saving inside the timed steps. Each engine runs in a fresh process (its own peak memory), first in
its best precision on this machine (bf16 autocast with fp32 master weights: CPUs with AVX512-BF16/AMX
and GPUs), then all in fp32. Beside them: taille from a top-K teacher cache (no teacher in memory), and
a torch.profiler breakdown of where taille's step time goes.

  taille      `taille.distill.train.distill`, the code behind `taille distill` (sliced, checkpointed
              logits; one final-hidden-state pass per model)
  hf-trainer  transformers.Trainer with compute_loss = KL(teacher || student) on full logits (the usual
              way people write KD on the Trainer)
  trl-gkd     trl.experimental.gkd.GKDTrainer with lmbda = 0 (no on-policy generation), beta = 0
              (forward KL), seq_kd off: off-policy distillation on the given blocks

Tokens/s = tokens per optimizer step / mean step time over the timed steps (after the warm-up ones).
Peak memory: the process's peak resident set on CPU (models, optimizer and activations; every engine
loads the same folders), and torch.cuda.max_memory_allocated on a GPU. On a GPU, MFU counts 6 N_student
+ 2 N_teacher matmul FLOPs per token (N: weights used in matmuls, the LM head included) plus attention.

Run:  .venv/bin/python benchmarks/distill_throughput.py [--teacher T --student S] [--steps 12]
Writes benchmarks/results/distill_throughput{SUFFIX}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ENGINES = ("taille", "hf-trainer", "trl-gkd")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


# --- one engine, in its own process --------------------------------------------------------------


def blocks_for(tokenizer, data: str, seq_len: int, count: int):
    from taille.data.tokens import load_tokens

    blocks = load_tokens(data, tokenizer, split="train", progress=False).blocks(seq_len)
    if len(blocks) < count:
        raise SystemExit(f"{data} has {len(blocks)} blocks of {seq_len}; the benchmark needs {count}")
    return blocks[:count]


def folder(spec: str) -> str:
    """An HF folder for any model taille loads (the embedded GGUF becomes its cached dequantized folder)."""
    from taille.models.load import gguf_as_folder, resolve_model

    source = resolve_model(spec)
    return str(gguf_as_folder(source.location)) if source.kind == "gguf" else source.location


def peak_memory_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class StepTimer:
    """Wall time of each optimizer step (synchronised on a GPU)."""

    def __init__(self, device: str):
        self.device, self.times, self.last = device, [], None

    def tick(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def run_taille(args, device: str) -> dict:
    from taille.distill.losses import LossConfig
    from taille.distill.train import DistillConfig, distill

    out = Path(tempfile.mkdtemp(prefix="taille-tp-"))
    steps = args.warmup + args.steps
    cfg = DistillConfig(student=args.student, data=args.data, out=str(out / "run"),
                        teacher=None if args.cache else args.teacher, teacher_cache=args.cache, eval_data=None,
                        tokens=steps * args.batch_size * args.seq_len, seq_len=args.seq_len,
                        batch_size=args.batch_size, lr=1e-5, min_lr=1e-6, warmup=1, loss=LossConfig(),
                        precision=args.precision, save_every=10**9, log_every=1, progress=False)
    profile = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        profile = torch_profile(activities=activities)
        profile.__enter__()
    distill(cfg)
    if profile is not None:
        profile.__exit__(None, None, None)
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in metrics if "tokens_per_s" in m][args.warmup:]
    seconds = [args.batch_size * args.seq_len / m["tokens_per_s"] for m in timed]
    result = {"step_seconds": seconds, "final_loss": timed[-1]["loss"]}
    if profile is not None:
        phases = phase_breakdown(profile)
        every_step = sum(args.batch_size * args.seq_len / m["tokens_per_s"] for m in metrics if "tokens_per_s" in m)
        result["profile"] = {**phases, "other (data, schedule, logging)": round(every_step - sum(phases.values()), 3)}
    return result


def phase_breakdown(profile) -> dict:
    """Seconds per phase (the record_function names in taille's loop), summed over all profiled steps:
    wall time of each region (on a GPU the profiled run sets CUDA_LAUNCH_BLOCKING=1, so a region's wall
    time includes its kernels)."""
    totals = {}
    for e in profile.key_averages():  # on a GPU a region is listed twice: on the CPU and as a GPU annotation
        if e.key.startswith("taille."):
            name = e.key.removeprefix("taille.")
            totals[name] = max(totals.get(name, 0.0), round(e.cpu_time_total / 1e6, 3))
    return totals


def kd_loss_full(student_logits, teacher_logits):
    """Forward KL(teacher || student) per position, summed: the textbook KD loss on whole logits."""
    import torch.nn.functional as F

    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(s, t, reduction="sum", log_target=True)


def run_hf(args, device: str, engine: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    steps = args.warmup + args.steps
    ids = blocks_for(tokenizer, args.data, args.seq_len, steps * args.batch_size)
    from datasets import Dataset

    dataset = Dataset.from_dict({"input_ids": ids.astype("int64").tolist()})

    def collate(rows):
        input_ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    # the teacher as taille holds it: bf16 on a GPU in mixed precision, else fp32
    t_dtype = torch.bfloat16 if device == "cuda" and args.precision == "bf16-mixed" else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=t_dtype).to(device).eval()
    teacher.requires_grad_(False)
    bf16 = args.precision == "bf16-mixed"
    common = dict(output_dir=tempfile.mkdtemp(prefix="hf-tp-"), per_device_train_batch_size=args.batch_size,
                  max_steps=steps, learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=1,
                  weight_decay=0.01, max_grad_norm=1.0, optim="adamw_torch", bf16=bf16, logging_steps=10**6,
                  save_strategy="no", report_to="none", dataloader_num_workers=0, gradient_checkpointing=False,
                  use_cpu=device == "cpu", seed=1234, disable_tqdm=True, remove_unused_columns=False)
    timer = StepTimer(device)

    class Timing(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if timer.last is None:
                timer.tick()

        def on_step_end(self, *_, **__):
            timer.tick()

    losses = []
    if engine == "hf-trainer":
        class KDTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                with torch.no_grad():
                    t_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                n = inputs["input_ids"][:, 1:].numel()
                loss = kd_loss_full(out.logits[:, :-1], t_logits[:, :-1]) / n
                losses.append(float(loss.detach()))
                return (loss, out) if return_outputs else loss

        trainer = KDTrainer(model=student, args=TrainingArguments(**common), train_dataset=dataset,
                            data_collator=collate, callbacks=[Timing()])
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config = GKDConfig(**common, lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, max_length=args.seq_len)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                             data_collator=collate, processing_class=tokenizer, callbacks=[Timing()])
    result = trainer.train()
    return {"step_seconds": timer.times[args.warmup:],
            "final_loss": losses[-1] if losses else result.training_loss}


def worker(args) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
    result = run_taille(args, device) if args.engine == "taille" else run_hf(args, device, args.engine)
    times = result.pop("step_seconds")
    result.update(tokens_per_s=args.batch_size * args.seq_len * len(times) / sum(times),
                  peak_mib=peak_memory_mib(device), steps_timed=len(times), device=device,
                  gpu=torch.cuda.get_device_name() if device == "cuda" else None)
    print("RESULT " + json.dumps(result), flush=True)


# --- the side-by-side table ------------------------------------------------------------------------


def matmul_flops_per_token(folder: str, seq_len: int, train: bool) -> float:
    """6 N (training) or 2 N (forward) over the weights used in matmuls, LM head included, plus the
    attention score and value products (12 or 4 x layers x attention width x context, PaLM's count)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name)
    if config.tie_word_embeddings:
        n += config.vocab_size * config.hidden_size
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    attention = config.num_hidden_layers * width * seq_len
    return (6 * n + 12 * attention) if train else (2 * n + 4 * attention)


def random_weights(config_folder: str, out: Path, device: str) -> str:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_folder), dtype=torch.bfloat16)
    model.save_pretrained(out)
    for f in Path(config_folder).iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    return str(out)


def launch(args, engine: str, precision: str, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--precision", precision, "--teacher", args.teacher,
           "--student", args.student, "--data", args.data, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), *extra]
    env = {**os.environ, "TAILLE_LOG": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    if "--profile" in extra:
        env["CUDA_LAUNCH_BLOCKING"] = "1"  # phases' wall time then holds their GPU kernels
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"{engine} {precision} failed:\n{proc.stderr[-3000:]}", flush=True)
        return {"engine": engine, "precision": precision, "error": proc.stderr.strip().splitlines()[-1:]}
    result = {"engine": engine, "precision": precision, **json.loads(lines[-1][len("RESULT "):]),
              "wall_s": round(time.time() - started, 1)}
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--student", default=None, help="default: the teacher pruned to 90M by the width recipe")
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per engine")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--precisions", default="best,fp32")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--cache-k", type=int, default=128, help="top-K of the teacher-cache run (0: skip)")
    parser.add_argument("--suffix", default="", help="results file suffix (e.g. -h100)")
    parser.add_argument("--random-init", action="store_true",
                        help="--teacher and --student are folders holding a config and a tokenizer; weights are drawn "
                             "at random (speed does not depend on them: lets a GPU machine without the checkpoints "
                             "measure real shapes)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.engine = args.worker
        return worker(args)

    import torch

    from taille.models.precision import resolve_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="taille-throughput-"))
    if args.random_init:
        if args.student is None:
            parser.error("--random-init needs --student (a folder with config.json and the tokenizer)")
        args.teacher = random_weights(args.teacher, work / "teacher", device)
        args.student = random_weights(args.student, work / "student", device)
    args.teacher = folder(args.teacher)
    if args.student is None:
        # weights do not change the speed: magnitude pruning needs no calibration pass
        args.student = str(work / "student")
        subprocess.run([sys.executable, "-m", "taille", "prune", "-m", args.teacher, "--params", "90M", "--axes",
                        "mlp,hidden,heads", "--criterion", "magnitude", "--out", args.student], check=True,
                       capture_output=True)
    best = resolve_precision("auto", device)
    precisions = [best if p == "best" else p for p in args.precisions.split(",")]
    precisions = list(dict.fromkeys(precisions))
    rows = [launch(args, engine, precision) for precision in precisions for engine in args.engines.split(",")]
    if args.cache_k:
        cache = work / f"cache-{args.cache_k}"
        tokens = (args.warmup + args.steps) * args.batch_size * args.seq_len
        made = subprocess.run([sys.executable, "-m", "taille", "teacher-cache", "--teacher", args.teacher, "--data",
                               args.data, "--top-k", str(args.cache_k), "--seq-len", str(args.seq_len), "--tokens",
                               str(tokens), "--out", str(cache)], capture_output=True, text=True)
        name = f"taille (teacher cache, K={args.cache_k})"
        if made.returncode == 0:
            rows.append({**launch(args, "taille", precisions[0], ["--cache", str(cache)]), "engine": name})
        else:
            print(f"teacher-cache failed:\n{made.stderr[-3000:]}", flush=True)
            rows.append({"engine": name, "precision": precisions[0], "error": made.stderr.strip().splitlines()[-1:]})
    profiled = launch(args, "taille", precisions[0], ["--profile"])

    flops = None
    if device == "cuda":
        flops = matmul_flops_per_token(args.student, args.seq_len, True) + matmul_flops_per_token(
            args.teacher, args.seq_len, False)
        gpu = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
        for r in rows:
            if "tokens_per_s" in r and peak and not r["engine"].startswith("taille (teacher cache"):
                r["mfu"] = round(r["tokens_per_s"] * flops / (peak * 1e12), 4)
    write(rows, profiled, args, device, flops)


def write(rows: list[dict], profiled: dict, args, device: str, flops: float | None) -> None:
    lines = ["| engine | precision | tokens/s | vs fastest other | peak memory (MiB) | final loss |" +
             (" MFU |" if flops else ""), "|---|---|---|---|---|---|" + ("---|" if flops else "")]
    for precision in dict.fromkeys(r["precision"] for r in rows):
        group = [r for r in rows if r["precision"] == precision and "tokens_per_s" in r]
        others = [r["tokens_per_s"] for r in group if not r["engine"].startswith("taille")]
        for r in [r for r in rows if r["precision"] == precision]:
            if "tokens_per_s" not in r:
                lines.append(f"| {r['engine']} | {precision} | failed: {r['error']} | | | |")
                continue
            ratio = f"{r['tokens_per_s'] / max(others):.2f}x" if others and r["engine"].startswith("taille") else ""
            lines.append(f"| {r['engine']} | {precision} | {r['tokens_per_s']:.1f} | {ratio} | {r['peak_mib']:.0f} | "
                         f"{r['final_loss']:.4f} |" + (f" {r.get('mfu', 0) * 100:.1f}% |" if flops else ""))
    profile = profiled.get("profile", {})
    total = sum(profile.values()) or 1.0
    lines += ["", "Where taille's step time goes (torch.profiler, " + profiled.get("precision", "") + ", all "
              f"{args.warmup + args.steps} steps):", "", "| phase | seconds | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / total:.0%} |" for k, v in sorted(profile.items(), key=lambda kv: -kv[1])]
    where = rows[0].get("gpu") or "CPU"
    note = (f"{where}; teacher {Path(args.teacher).name}, student {Path(args.student).name}; batch {args.batch_size} x "
            f"seq {args.seq_len}, {args.steps} timed steps after {args.warmup} warm-up; each engine in its own process.")
    RESULTS.mkdir(exist_ok=True)
    name = f"distill_throughput{args.suffix}"
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n\n" + note + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "profile": profiled, "settings": vars(args),
                                                      "flops_per_token": flops}, indent=1) + "\n")
    print("\n".join(lines) + "\n\n" + note)


if __name__ == "__main__":
    main()
