"""The `taille` command: one entry mapping verbs to typed functions.

Each verb's docstring and option help are its `taille VERB -h`. Every verb also takes
`--config FILE.yaml`: a mapping of option names (dashes or underscores) to values, which flags given on
the command line override. The functions here only parse and print; the work lives in the stage
packages, imported lazily so `taille -h` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from taille.errors import TailleError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Cut a large language model down to a small one that keeps its quality, and run it on a PC.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", help="Hub id (org/name[@revision]), local Hugging Face folder, .gguf file, or an embedded "
    "name (smollm2-135m-instruct).", show_default=False)]
DtypeOpt = Annotated[str, typer.Option(help="Weight dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[str, typer.Option(
    help="auto (bf16-mixed on GPUs and on CPUs with AMX/AVX512-BF16, else fp32), bf16-mixed or fp32.")]


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(n)


def _print_table(title: str, header: list[str], rows: list[list], right: set[int] = frozenset()) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")  # piped output gets room instead of 80 columns
    for i, h in enumerate(header):
        table.add_column(h, justify="right" if i in right else "left")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _axes(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


@app.command()
def info(
    model: ModelArg,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Show a model's shape, parameters, weight sizes and prunable axes.

    Family; layers, hidden, MLP, heads, KV heads, head_dim, vocab; parameters split into embeddings,
    attention, MLP, norms and lm_head (tied weights counted once); weight size at bf16, q8_0 and q4_0;
    the axes pruning can cut and their step. Reads the config only: no weights are loaded.
    """
    from taille.models.load import load_config
    from taille.models.summary import PARTS, summarize

    summary = summarize(load_config(model))
    if json_out:
        print(json.dumps({"model": model, **summary.to_dict()}, indent=2))
        return
    s = summary
    _print_table(f"{model} ({s.family}, model_type {s.model_type})", ["", "value"], [
        ["layers", s.layers], ["hidden", s.hidden], ["MLP", s.mlp], ["heads / KV heads", f"{s.heads} / {s.kv_heads}"],
        ["head_dim", s.head_dim], ["vocab", f"{s.vocab:,}"], ["tied embeddings", "yes" if s.tied_embeddings else "no"],
    ], right={1})
    total = s.params["total"]
    rows = [[part, f"{s.params[part]:,}", f"{100 * s.params[part] / total:.1f}%"]
            for part in PARTS if s.params[part] or part != "other"]
    rows.append(["total", f"{total:,}", _human(total)])
    _print_table("parameters", ["part", "count", "share"], rows, right={1, 2})
    _print_table("weights", ["format", "size"], [[f, f"{b / 2**20:,.1f} MiB"] for f, b in s.weight_bytes.items()],
                 right={1})
    _print_table("prunable axes", ["axis", "size", "step", "rule"],
                 [[a.name, a.size, a.granularity, a.note] for a in s.axes], right={1, 2})


@app.command("eval")
def eval_(
    models: Annotated[list[str], typer.Argument(metavar="MODEL...", help="One or more models (see `taille info -h`).",
                                                show_default=False)],
    ppl: Annotated[Optional[list[str]], typer.Option(
        help="Held-out text for perplexity; repeat for several: shakespeare (its held-out plays), "
        "wikitext2:PATH/wiki.test.raw, a file or folder, hf://name:split.")] = None,
    window: Annotated[int, typer.Option(help="Tokens per perplexity window.")] = 1024,
    stride: Annotated[Optional[int], typer.Option(
        help="Tokens between window starts (default: --window, non-overlapping). With stride < window each "
        "scored token has at least window - stride tokens of context.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Only the first N tokens of each text.")] = None,
    tasks: Annotated[Optional[str], typer.Option(
        help="Zero-shot tasks through lm-evaluation-harness, comma-separated: arc_easy,arc_challenge,piqa,"
        "winogrande,hellaswag,lambada_openai,boolq,copa,openbookqa,sciq (any lm-eval task online).")] = None,
    task_data: Annotated[Optional[str], typer.Option(
        help="Offline: folder with local copies of the task files (the layout of shared/data/eval).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most N examples per task.")] = None,
    num_fewshot: Annotated[int, typer.Option(help="Few-shot examples per prompt.")] = 0,
    speed: Annotated[bool, typer.Option(help="Prefill and decode tokens/s and peak memory at batch 1 and 8.")] = False,
    reference: Annotated[Optional[str], typer.Option(help="A model (e.g. the teacher) to measure each model's KL to.")] = None,
    reference_data: Annotated[str, typer.Option(help="Held-out text for --reference.")] = "shakespeare",
    batch_size: Annotated[int, typer.Option(help="Windows or task requests per forward pass.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed for lm-eval (few-shot sampling).")] = 1234,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Folder for eval.md, eval.json and eval.png.")] = None,
) -> None:
    """Evaluate models side by side: perplexity, zero-shot tasks, speed, memory, KL to a reference.

    Perplexity uses a sliding window: windows of --window tokens start every --stride tokens and each
    token is scored once, in the first window that gives it context. Shakespeare is read from its
    held-out plays unless a split is named (shakespeare:train). Tasks run through lm-evaluation-harness on
    the model in memory, with its standard prompts and metrics (acc, acc_norm, perplexity); the table shows
    acc_norm where a task has it.
    """
    from taille.eval.run import EvalSettings, evaluate, markdown, write_report
    from taille.models.load import resolve_device
    from taille.models.precision import resolve_precision

    settings = EvalSettings(
        ppl=list(ppl or []), window=window, stride=stride, batch_size=batch_size, max_tokens=max_tokens,
        tasks=list(_axes(tasks or "")), task_data=task_data, limit=limit, num_fewshot=num_fewshot, speed=speed,
        reference=reference, reference_data=reference_data, precision=resolve_precision(precision, resolve_device(device)),
        dtype=dtype, device=device, seed=seed)
    report = evaluate(models, settings)
    if out:
        write_report(report, out)
    if json_out:
        print(json.dumps(report, indent=2, default=str))
        return
    print(markdown(report))
    for r in report["rows"]:
        for text, p in r["ppl"].items():
            print(f"{r['model']} on {text}: ppl {p['ppl']:.3f} over {p['scored_tokens']:,} tokens, window {p['window']} / "
                  f"stride {p['stride']}, {p['precision']}, {p['seconds']} s")
    if out:
        print(f"report: {out / 'eval.md'}, {out / 'eval.json'}, {out / 'eval.png'}")


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="The model to prune (see `taille info -h`).",
                                         show_default=False)]
DataOpt = Annotated[Optional[str], typer.Option(
    help="Calibration text (see README): shakespeare (its calibration plays), a file or folder, hf://name:split.")]
SamplesOpt = Annotated[int, typer.Option(help="Calibration blocks (Minitron uses 1024).")]
SeqLenOpt = Annotated[int, typer.Option(help="Tokens per calibration block.")]
BatchOpt = Annotated[int, typer.Option(help="Blocks per forward pass.")]


@app.command()
def importance(
    model: ModelOpt,
    data: DataOpt = "shakespeare",
    out: Annotated[Path, typer.Option(help="Folder for scores.safetensors, importance.json and the PNG figures.")] = Path("importance"),
    samples: SamplesOpt = 1024,
    seq_len: SeqLenOpt = 512,
    batch_size: BatchOpt = 8,
    depth_metric: Annotated[str, typer.Option(
        help="bi: block importance only (one pass); ppl: also the held-out loss without each layer (one pass per layer).")] = "bi",
    block_sizes: Annotated[str, typer.Option(help="With --depth-metric ppl: sizes n of contiguous blocks to score, e.g. 1,4,8.")] = "1",
    depth_samples: Annotated[int, typer.Option(help="Blocks held apart from calibration for the depth loss.")] = 32,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    figures: Annotated[bool, typer.Option(help="Write heads.png, neurons.png and layers.png.")] = True,
) -> None:
    """Score heads, MLP neurons, hidden channels and layers by their activations (Minitron).

    One streaming pass of forward hooks over the calibration blocks: per head the input of o_proj, per
    neuron the input of down_proj, per hidden channel the outputs of the norms feeding each block and the
    final norm; mean of |x| over the sequence, then L2 over the batch. Per layer and per contiguous block:
    block importance 1 - cos(input, output); with --depth-metric ppl, the held-out loss without it.
    """
    from taille.prune.prune import Calibration, run_importance

    sizes = tuple(int(n) for n in block_sizes.split(","))
    folder = run_importance(model, Calibration(data, samples, seq_len, batch_size, depth_samples), out, depth_metric,
                            sizes, dtype, device, precision, figures)
    summary = json.loads((folder / "importance.json").read_text())
    print(f"scores of {model} on {summary.get('data')}: {summary['samples']} blocks x {summary['seq_len']} tokens "
          f"in {summary['seconds']} s -> {folder}")
    if summary.get("layers_by_bi"):
        print(f"layers by block importance, least important first: {summary['layers_by_bi']}")
    if summary.get("layers_by_loss"):
        print(f"layers by loss without them, least important first: {summary['layers_by_loss']}")


@app.command()
def prune(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="Output folder: a standard Hugging Face checkpoint + taille.json.",
                                      show_default=False)],
    scores: Annotated[Optional[Path], typer.Option(help="Scores from `taille importance` (folder).")] = None,
    data: DataOpt = None,
    params: Annotated[Optional[str], typer.Option(help="Target parameter count (90M, 4.5B), tied weights once.")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="Target as a fraction of the model's parameters.")] = None,
    axes: Annotated[str, typer.Option(help="Axes a --params/--ratio target may cut: mlp, hidden, heads, kv_groups, depth.")] = "mlp,hidden",
    tolerance: Annotated[float, typer.Option(help="How close to the target the shape must land.")] = 0.01,
    hidden: Annotated[Optional[int], typer.Option(help="Explicit shape: hidden size.")] = None,
    ffn: Annotated[Optional[int], typer.Option(help="Explicit shape: MLP width.")] = None,
    heads: Annotated[Optional[int], typer.Option(help="Explicit shape: query heads (a multiple of --kv-heads).")] = None,
    kv_heads: Annotated[Optional[int], typer.Option(help="Explicit shape: KV heads (fewer prunes whole KV groups).")] = None,
    layers: Annotated[Optional[int], typer.Option(help="Explicit shape: layers to keep (which, by --depth-criterion).")] = None,
    drop_layers: Annotated[Optional[str], typer.Option(help="Layers to remove, 0-based: 14-25 or 3,5,10-12.")] = None,
    criterion: Annotated[str, typer.Option(help="Width ranking: activation (Minitron), magnitude (weight L2), random (seeded).")] = "activation",
    depth_criterion: Annotated[str, typer.Option(
        help="Which layers go: block-importance (lowest BI), ppl (lowest loss without it), contiguous (lowest-BI block).")] = "block-importance",
    seed: Annotated[int, typer.Option(help="Seed of the random criterion.")] = 0,
    samples: SamplesOpt = 1024,
    seq_len: SeqLenOpt = 512,
    batch_size: BatchOpt = 8,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Prune a model to a target size or shape and save a standard Hugging Face checkpoint.

    Widths stay equal in every layer, so the output has a standard config that plain
    AutoModelForCausalLM.from_pretrained loads. Query heads are pruned evenly inside each KV group;
    head_dim never changes. A --params/--ratio target picks, among the shapes within --tolerance, the one
    that cuts the chosen axes most evenly.
    """
    from taille.prune.prune import Calibration, Target, run_prune

    target = Target(params=params, ratio=ratio, axes=_axes(axes), hidden=hidden, ffn=ffn, heads=heads,
                    kv_heads=kv_heads, layers=layers, drop_layers=drop_layers, tolerance=tolerance)
    cal = Calibration(data, samples, seq_len, batch_size) if data else None
    record = run_prune(model, target, out, str(scores) if scores else None, cal, criterion, depth_criterion, seed,
                       dtype, device, precision)
    b, a = record["shape_before"], record["shape_after"]
    _print_table(f"{model} -> {out}", ["", "before", "after"], [
        [k, b[k], a[k]] for k in ("layers", "hidden", "ffn", "heads", "kv_heads")] + [
        ["parameters", f"{record['params_before']:,}", f"{record['params_after']:,}"]], right={1, 2})


@app.command()
def distill(
    student: Annotated[str, typer.Option(help="The model to train (e.g. a `taille prune` output).", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder: the student, checkpoints/, metrics.jsonl, curves.png.",
                                      show_default=False)],
    data: Annotated[Optional[str], typer.Option(
        help="Training text (shakespeare = its training plays; files; hf://...), or a weighted mixture "
             "shakespeare:0.5,gen.jsonl:0.5.")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="The frozen teacher (omit for CE-only training).")] = None,
    teacher_cache: Annotated[Optional[str], typer.Option(
        help="A `taille teacher-cache` folder to train from instead of a teacher in memory.")] = None,
    eval_data: Annotated[str, typer.Option(help="Held-out text; auto = shakespeare's held-out plays when training on "
                                           "shakespeare; 'none' to skip.")] = "auto",
    tokens: Annotated[str, typer.Option(help="Training budget in tokens (2M, 1.5B, ...).")] = "1M",
    seq_len: Annotated[int, typer.Option(help="Tokens per block.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Blocks per process per micro-step.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-steps per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (Minitron: 1e-4).")] = 1e-4,
    min_lr: Annotated[float, typer.Option(help="Learning rate at the end of the cosine.")] = 1e-5,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 40,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay on matrices.")] = 0.01,
    clip: Annotated[float, typer.Option(help="Gradient-norm clipping (0: off).")] = 1.0,
    loss: Annotated[str, typer.Option(help="fkl (forward KL, Minitron), rkl (reverse KL) or jsd.")] = "fkl",
    beta: Annotated[float, typer.Option(help="JSD interpolation.")] = 0.5,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of both models.")] = 1.0,
    ce_weight: Annotated[float, typer.Option(help="Weight of cross-entropy on the data's next tokens.")] = 0.0,
    kd_weight: Annotated[float, typer.Option(help="Weight of the distillation term.")] = 1.0,
    hidden_layers: Annotated[Optional[str], typer.Option(
        help="Also match intermediate hidden states (1 - cosine): 'auto' (4 student layers up to the last, each with "
             "the teacher layer it was pruned from) or STUDENT:TEACHER pairs like 8:14,17:29; a learned projection "
             "maps a narrower student to the teacher's width.")] = None,
    hidden_weight: Annotated[float, typer.Option(help="Weight of the hidden-state term.")] = 1.0,
    precision: PrecisionOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed of data order and initialisation.")] = 1234,
    eval_every: Annotated[int, typer.Option(help="Optimizer steps between held-out evaluations.")] = 50,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens per evaluation.")] = 32768,
    save_every: Annotated[int, typer.Option(help="Optimizer steps between checkpoints.")] = 100,
    log_every: Annotated[int, typer.Option(help="Optimizer steps between metric lines.")] = 5,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/latest, exactly.")] = False,
    report_to: Annotated[str, typer.Option(help="Also log to tensorboard (OUT/taille-distill) or wandb; none: "
                                           "metrics.jsonl and curves.png only.")] = "none",
) -> None:
    """Distil a teacher into a student: forward KL on the logits at temperature 1 (Minitron).

    AdamW, linear warm-up then cosine to --min-lr, gradient clipping and accumulation; bf16 autocast where
    the hardware has fast bf16, with fp32 weights and optimizer state. Logits are computed in slices of
    tokens and rebuilt in backward, so no (batch, seq, vocab) tensor is ever held. Runs unchanged under
    `accelerate launch` or `torchrun` (DDP; FSDP through `accelerate config`). Checkpoints are written
    atomically every --save-every steps; --resume continues with the same data order and optimizer state.
    """
    from taille.distill.losses import LossConfig
    from taille.distill.train import DistillConfig, distill as run
    from taille.prune.shape import parse_params

    cfg = DistillConfig(
        student=student, data=data, out=str(out), teacher=teacher, teacher_cache=teacher_cache,
        eval_data=None if eval_data == "none" else eval_data, tokens=parse_params(tokens), seq_len=seq_len,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=min_lr, warmup=warmup, weight_decay=weight_decay,
        clip=clip, loss=LossConfig(loss, beta, temperature, ce_weight, kd_weight), hidden_layers=hidden_layers,
        hidden_weight=hidden_weight, precision=precision, seed=seed,
        eval_every=eval_every, eval_tokens=eval_tokens, save_every=save_every, log_every=log_every, resume=resume,
        report_to=report_to)
    record = run(cfg)
    print(f"distilled {record['tokens']:,} tokens in {record['steps']} steps ({record['precision']}, "
          f"{record['processes']} process(es)); final loss {record['final_loss']:.4f} -> {out}")


@app.command()
def correct(
    teacher: Annotated[str, typer.Option(help="The teacher to correct.", show_default=False)],
    data: Annotated[str, typer.Option(help="The distillation data.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Folder for the corrected teacher.", show_default=False)],
    tokens: Annotated[str, typer.Option(help="Fine-tuning budget in tokens.")] = "1M",
    lr: Annotated[float, typer.Option(help="Peak learning rate: low (Minitron: 1/5 of the original peak).")] = 2e-5,
    min_lr: Annotated[float, typer.Option(help="Learning rate at the end of the cosine.")] = 2e-6,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 20,
    seq_len: SeqLenOpt = 512,
    batch_size: BatchOpt = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-steps per optimizer step.")] = 1,
    precision: PrecisionOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed of data order.")] = 1234,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/latest.")] = False,
) -> None:
    """Teacher correction: lightly fine-tune the teacher on the distillation data (cross-entropy, low LR).

    When the teacher's own training data is out of reach, this adapts it to the data the student will be
    distilled on (Minitron: >6% lower validation loss after distillation). Same loop as `distill`.
    """
    from taille.distill.losses import LossConfig
    from taille.distill.train import DistillConfig, distill as run
    from taille.prune.shape import parse_params

    record = run(DistillConfig(
        student=teacher, data=data, out=str(out), tokens=parse_params(tokens), seq_len=seq_len, batch_size=batch_size,
        grad_accum=grad_accum, lr=lr, min_lr=min_lr, warmup=warmup, loss=LossConfig(ce_weight=1.0, kd_weight=0.0),
        precision=precision, seed=seed, resume=resume))
    print(f"corrected teacher: {record['tokens']:,} tokens, final loss {record['final_loss']:.4f} -> {out}")


@app.command("teacher-cache")
def teacher_cache(
    out: Annotated[Path, typer.Option(help="Folder for the cache.", show_default=False)],
    teacher: Annotated[Optional[str], typer.Option(help="The teacher model.", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option(help="Training text to cache the teacher on.", show_default=False)] = None,
    from_cache: Annotated[Optional[Path], typer.Option("--from", help="Cut a smaller --top-k out of this cache instead "
                                                       "(no teacher, no data: the same blocks).", show_default=False)] = None,
    top_k: Annotated[int, typer.Option(help="Teacher log-probabilities kept per position (Minitron: K <= 100 hurt).")] = 128,
    seq_len: SeqLenOpt = 512,
    tokens: Annotated[Optional[str], typer.Option(help="Cache only the first N tokens of the data.")] = None,
    batch_size: BatchOpt = 8,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Store a teacher's top-K next-token distributions over a corpus, once, for `distill --teacher-cache`.

    Per position: the K largest log-probabilities (fp16), their token ids (int32) and the log of the
    probability mass left outside them, in memory-mapped files with the token blocks themselves. With
    --from, a cache of a larger K gives one of a smaller K in seconds (compare several K for one teacher pass).
    """
    from taille.distill.cache import build_cache, shrink_cache
    from taille.models.load import load_model, resolve_device
    from taille.models.precision import resolve_precision
    from taille.prune.shape import parse_params

    if from_cache is not None:
        if teacher or data or tokens:
            raise TailleError("--from reuses a cache's teacher, data and blocks: leave out --teacher, --data and --tokens")
        folder = shrink_cache(from_cache, out, top_k)
    elif not teacher or not data:
        raise TailleError("give --teacher and --data (or --from CACHE to cut a smaller K out of an existing cache)")
    else:
        model, tokenizer = load_model(teacher, dtype=dtype, device=device)
        folder = build_cache(model, tokenizer, data, out, top_k, seq_len, parse_params(tokens) if tokens else None,
                             batch_size, resolve_precision(precision, resolve_device(device)))
    meta = json.loads((folder / "meta.json").read_text())
    print(f"cached {meta['blocks']} blocks x {meta['seq_len']} tokens of {meta['data']}, top-{top_k}: "
          f"{meta['bytes'] / 2**20:,.1f} MiB in {meta['seconds']} s -> {folder}")


@app.command()
def plan(
    model: ModelArg,
    params: Annotated[Optional[str], typer.Option(help="Parameter target (8B, 90M).")] = None,
    memory: Annotated[Optional[str], typer.Option(help="Memory budget on the player's device (6GB), weights + KV cache.")] = None,
    quant: Annotated[str, typer.Option(help="Quantization the memory budget assumes: bf16, q8_0, q4_k_m, q4_0.")] = "q4_k_m",
    context: Annotated[int, typer.Option(help="Context length the KV cache must hold.")] = 4096,
    tolerance: Annotated[float, typer.Option(help="How far from the target a candidate may land.")] = 0.05,
    top: Annotated[int, typer.Option(help="Rows to print (the JSON has them all).")] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="Print every candidate as JSON.")] = False,
) -> None:
    """List the shapes a model could be pruned to for a budget, from its config alone (no weights).

    Layers (down to half), hidden in multiples of 64 (or of the head count where transformers needs it),
    MLP in multiples of 256, query heads per KV group; exact parameter counts, weight size per
    quantization and the fp16 KV cache at --context. Sorted by how evenly the axes are cut (Minitron's
    width recipe first); depth-heavy shapes follow.
    """
    from taille.models.load import load_config
    from taille.prune.shape import parse_params
    from taille.search.plan import plan as make_plan

    if memory is not None:
        gib = float(memory.upper().removesuffix("GB").removesuffix("GIB").strip())
    candidates = make_plan(load_config(model), parse_params(params) if params else None,
                           gib if memory is not None else None, quant, context, tolerance)
    if json_out:
        print(json.dumps([c.to_dict() for c in candidates], indent=1))
        return
    rows = [[c.shape.layers, c.shape.hidden, c.shape.ffn, f"{c.shape.heads}/{c.shape.kv_heads}", f"{c.params:,}",
             *[f"{v:.2f}" for v in c.weights_gib.values()], f"{c.kv_cache_gib:.2f}", f"{c.balance:.2f}"]
            for c in candidates[:top]]
    _print_table(f"{len(candidates)} candidate shapes for {model} (first {min(top, len(candidates))})",
                 ["layers", "hidden", "MLP", "heads/kv", "params", *[f"{q} GiB" for q in candidates[0].weights_gib],
                  f"KV@{context} GiB", "max cut"], rows, right=set(range(11)))


@app.command()
def generate(
    teacher: Annotated[str, typer.Option(help="The model whose answers make the corpus.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Chat JSONL to write (appended to; OUT.meta.json beside it).",
                                      show_default=False)],
    prompts: Annotated[str, typer.Option(help="'seed' (the shipped general set), or a .txt (a prompt a line) or "
                                         ".jsonl ({\"prompt\": ...} or {\"messages\": [...]}) file.")] = "seed",
    tokens: Annotated[str, typer.Option(help="Answer tokens to keep (300K, 2M).")] = "300K",
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = 0.95,
    batch_size: Annotated[int, typer.Option(help="Prompts sampled together (PyTorch engine).")] = 64,
    min_tokens: Annotated[int, typer.Option(help="Drop answers shorter than this.")] = 16,
    near_duplicate: Annotated[float, typer.Option(help="Word 5-gram Jaccard above which an answer is a "
                                                  "near-duplicate of an earlier one (1: exact only).")] = 0.7,
    language: Annotated[str, typer.Option(help="Keep answers in this language: en, or none.")] = "en",
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 1234,
    precision: PrecisionOpt = "auto",
    engine: Annotated[str, typer.Option(help="auto (= torch: batched PyTorch, the faster here), torch, or llama.cpp "
                                        "(a GGUF teacher, one sequence at a time).")] = "auto",
    self_instruct: Annotated[int, typer.Option(help="New prompts the teacher writes from the seed set first "
                                               "(kept in OUT.prompts.jsonl).")] = 0,
) -> None:
    """Sample a distillation corpus from the teacher: prompts in, teacher answers out, as chat JSONL for --data.

    Each prompt is answered in rounds until --tokens answer tokens are kept; answers too short, not in
    --language, or exact / near duplicates of earlier ones are dropped. Records are appended as they come:
    run it again to continue (done prompt rounds are skipped). A teacher without a chat template gets
    plain continuations (text records), and says so. OUT.meta.json: engine, tokens/s, what was filtered.
    """
    from taille.generate.generate import GenerateSettings, generate as run
    from taille.prune.shape import parse_params

    meta = run(GenerateSettings(teacher=teacher, out=str(out), prompts=prompts, tokens=parse_params(tokens),
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                batch_size=batch_size, min_tokens=min_tokens, near_duplicate=near_duplicate,
                                language=None if language == "none" else language, seed=seed, precision=precision,
                                engine=engine, self_instruct=self_instruct))
    print(f"{meta['records']:,} records, {meta['tokens_kept']:,} answer tokens -> {out} ({meta['engine']}; "
          f"{meta['generation_tokens_per_s']} generated tokens/s this run; duplicate rate "
          f"{meta['duplicate_rate_this_run']})")


@app.command()
def search(
    model: Annotated[str, typer.Option("--model", "-m", help="The teacher.", show_default=False)],
    data: Annotated[str, typer.Option(help="Calibration and distillation text.", show_default=False)],
    params: Annotated[str, typer.Option(help="Parameter target (90M, 4.5B).", show_default=False)],
    out: Annotated[Path, typer.Option(help="Folder: leaderboard.{md,json,png}, winner.yaml, candidates.",
                                      show_default=False)],
    scores: Annotated[Optional[Path], typer.Option(help="Scores from `taille importance` (else computed here).")] = None,
    candidates: Annotated[int, typer.Option(help="Shapes to try.")] = 12,
    steps: Annotated[int, typer.Option(help="Distillation steps per candidate (the same for all).")] = 50,
    tolerance: Annotated[float, typer.Option(help="How far from the target a shape may land.")] = 0.05,
    seq_len: Annotated[int, typer.Option(help="Tokens per block.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Blocks per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate of each short distillation.")] = 5e-4,
    top_k: Annotated[int, typer.Option(help="Teacher-cache K.")] = 128,
    samples: Annotated[int, typer.Option(help="Calibration blocks, when importance runs here.")] = 128,
    precision: PrecisionOpt = "auto",
) -> None:
    """Architecture search (Minitron): prune each candidate shape near the target and distil each briefly
    from one teacher cache, then rank by held-out loss.

    Importance runs once (or comes from --scores); the teacher runs once, into a top-K cache; every
    candidate gets the same steps. The default width shape is always among the candidates, so the
    leaderboard says whether the search beat it. A search run again skips finished candidates.
    """
    from taille.prune.prune import Calibration, run_importance
    from taille.search.search import SearchSettings, run_search

    settings = SearchSettings(params=params, tolerance=tolerance, candidates=candidates, steps=steps, seq_len=seq_len,
                              batch_size=batch_size, lr=lr, top_k=top_k, precision=precision)
    if scores is None:
        scores = out / "importance"
        if not (scores / "importance.json").is_file():
            run_importance(model, Calibration(data=data, samples=samples), scores)
    board = run_search(model, data, scores, settings, out)
    _print_table(f"architecture search: {len(board['rows'])} candidates", board["header"][:-1],
                 [r[:-1] for r in board["rows"]], right=set(range(1, 9)))
    print(board["summary"])
    print(f"leaderboard: {out / 'leaderboard.md'}; winner as a recipe section: {out / 'winner.yaml'}")


@app.command("run")
def run_cmd(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", help="A recipe YAML file, or a shipped recipe's name.",
                                          show_default=False)],
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default: the recipe's out, else runs/NAME).")] = None,
    until: Annotated[Optional[str], typer.Option(help="Stop after this stage (correct, importance, search, prune, "
                                                 "distill, eval, export, report).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Check the recipe and print the shapes it will produce, from the "
                                          "teacher's config alone; run nothing.")] = False,
) -> None:
    """Run a recipe: (teacher correction) -> importance -> (search) -> prune -> distil -> evaluate -> (GGUF
    export, verified in llama.cpp) -> report.

    Every stage writes one folder of the run and is skipped when its output is there, so a killed run
    started again goes on where it stopped (a distillation from its last checkpoint). Ends with
    report.md and report.html.
    """
    if dry_run:
        from taille.run.recipe import load_recipe, plan_recipe

        planned = plan_recipe(load_recipe(recipe))
        rows = [[name, *p["shape"].values(), f"{p['params']:,}"] for name, p in
                (("teacher", planned["teacher"]), ("prune target", planned.get("prune"))) if p]
        rows += [[f"search candidate{' (default)' if c['default'] else ''}", *c["shape"].values(), f"{c['params']:,}"]
                 for c in planned.get("search", [])]
        _print_table(f"recipe {recipe}: planned shapes", ["", "hidden", "MLP", "heads", "KV heads", "layers", "params"],
                     rows, right=set(range(1, 7)))
        return
    _run_and_show(recipe, out, until)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/demo"),
) -> None:
    """The main job on the embedded default: SmolLM2-135M-Instruct pruned to ~90M on Shakespeare, distilled
    from the teacher, and evaluated against it (about 8 minutes on a 2-core CPU). The shipped recipe
    `smollm2-135m-to-90m`; prints the table and the report's path."""
    _run_and_show("smollm2-135m-to-90m", out, None)


def _run_and_show(recipe_spec: str, out: Optional[Path], until: Optional[str]) -> None:
    import yaml

    from taille.run.pipeline import run_recipe
    from taille.run.recipe import load_recipe

    recipe = load_recipe(recipe_spec)
    raw = yaml.safe_load(Path(recipe.source).read_text())
    run = run_recipe(recipe, raw, str(out) if out else None, until)
    if (run / "eval" / "eval.json").is_file():
        from taille.eval.run import table
        from taille.run.report import recovery

        report = json.loads((run / "eval" / "eval.json").read_text())
        header, rows = table(report)
        print(f"{recipe.name}: teacher vs pruned vs distilled")  # a table title would wrap at the table's width
        _print_table("", header, rows, right=set(range(1, len(header))))
        won = recovery(report)
        if won is not None:
            print(f"distillation won back {won:.0%} of the log-perplexity that pruning lost")
    if (run / "export" / "export.json").is_file():
        for r in json.loads((run / "export" / "export.json").read_text()):
            v = r.get("verify")
            agreement = f", top-1 agreement with PyTorch {v['top1_agreement']:.1%}" if v else ""
            print(f"on-device: {r['out']} ({r['quant']}, {r['bytes'] / 2**20:.1f} MiB{agreement}); talk to it: "
                  f"taille chat {r['out']}")
    if (run / "report.html").is_file():
        print(f"report: {run / 'report.html'} (and report.md)")


@app.command()
def export(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="The .gguf file (--format gguf) or folder (--format hf) to write.",
                                      show_default=False)],
    format: Annotated[str, typer.Option(help="gguf (llama.cpp) or hf (a clean safetensors folder).")] = "gguf",
    quant: Annotated[str, typer.Option(help="GGUF type: f16, q8_0, q4_k_m, q4_0 (also f32, bf16, q6_k, q5_k_m).")] = "q4_k_m",
    verify: Annotated[bool, typer.Option(help="Run the file in llama.cpp against the PyTorch model: top-1 "
                                         "agreement, mean KL, perplexity, tokenizer and chat template.")] = False,
    verify_data: Annotated[str, typer.Option(help="Held-out text for --verify.")] = "shakespeare",
    verify_blocks: Annotated[int, typer.Option(help="Blocks of --verify-len tokens compared.")] = 8,
    verify_len: Annotated[int, typer.Option(help="Tokens per compared block.")] = 128,
    name: Annotated[Optional[str], typer.Option(help="general.name in the file (default: the model's name).")] = None,
    pre_tokenizer: Annotated[Optional[str], typer.Option(help="llama.cpp pre-tokenizer name to write when the "
                                                         "converter does not recognize the tokenizer's (qwen2, llama-bpe...).")] = None,
    dtype: Annotated[str, typer.Option(help="--format hf: weight dtype (auto keeps fp32; bf16, fp16).")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Write a model for on-device use: GGUF for llama.cpp, or a clean Hugging Face folder.

    GGUF: llama.cpp's own converter writes the weights, tokenizer, special tokens and chat template at 16
    bits, then llama.cpp's quantizer makes --quant. --verify then loads the file in llama.cpp and compares
    it with the PyTorch model on held-out text; f16 must agree on >= 99% of next-token predictions,
    bf16 and q8_0 on >= 97% (other types are reported only). Exit status 3 when verification fails.
    """
    if format == "hf":
        from taille.export.hf import export_hf

        record = export_hf(model, out, dtype)
        print(json.dumps(record, indent=1) if json_out else f"wrote {out}: {', '.join(record['files'])}")
        return
    if format != "gguf":
        raise TailleError(f"--format {format}: use gguf or hf")
    from taille.export.gguf import export_gguf
    from taille.models.quant import get_quant

    record = export_gguf(model, out, quant, name=name, pre_tokenizer=pre_tokenizer)
    if verify:
        from taille.export.verify import verify_gguf

        record["verify"] = verify_gguf(out, model, verify_data, verify_blocks, verify_len,
                                       min_agreement=get_quant(quant).min_agreement)
    if json_out:
        print(json.dumps(record, indent=1))
    else:
        types = ", ".join(f"{k} {v}" for k, v in sorted(record["tensor_types"].items(), key=lambda kv: -kv[1]))
        print(f"wrote {out}: {record['bytes'] / 2**20:.1f} MiB, {quant}, tensors: {types} ({record['seconds']} s)")
        if record["widths_kept_larger"]:
            print(f"  widths not divisible by the {quant} block, kept at a larger type: "
                  f"{', '.join(record['widths_kept_larger'])}")
        if verify:
            v = record["verify"]
            need = f" (needs >= {v['min_agreement']:.0%})" if v["min_agreement"] else ""
            print(f"verify on {v['positions']} positions of {v['data']}: top-1 agreement {v['top1_agreement']:.2%}"
                  f"{need}, mean KL {v['mean_kl']:.5f}, perplexity PyTorch {v['ppl_pytorch']:.2f} / llama.cpp "
                  f"{v['ppl_gguf']:.2f}; tokenizer same on {v['tokenizer_same']} texts; chat template "
                  f"{ {True: 'same', False: 'DIFFERENT', None: 'absent'}[v['chat_template_same']] }")
            print(f"verify: {'PASS' if v['passed'] else 'FAIL'}")
    if verify and not record["verify"]["passed"]:
        sys.exit(3)


@app.command()
def bench(
    gguf: Annotated[Path, typer.Argument(metavar="MODEL.gguf", help="The GGUF file.", show_default=False)],
    prompt: Annotated[int, typer.Option(help="Prompt tokens (prefill).")] = 256,
    decode: Annotated[int, typer.Option(help="Tokens generated one by one (decode).")] = 64,
    ctx: Annotated[int, typer.Option(help="Context window the model is loaded with.")] = 2048,
    repeats: Annotated[int, typer.Option(help="Measured runs (the median is shown) after one warm-up.")] = 3,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: every core).")] = None,
    budgets: Annotated[str, typer.Option(help="Memory budgets in GB for the fit table.")] = "4,6,8,12",
    contexts: Annotated[str, typer.Option(help="Context lengths for the fit table.")] = "2048,4096,8192,32768",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """llama.cpp speed and memory of a GGUF file on this machine, and which PCs it fits.

    Prefill and decode tokens/s come from llama.cpp's own counters (what llama-bench reports); memory is the
    process's peak rise. The fit table adds the KV cache (f16) of each context length to the weights at
    each quantization (this file's own type measured, the others estimated from its parameter count) and
    names the smallest memory budget that holds it.
    """
    from taille.bench.bench import bench_gguf, fit_table, read_shape

    try:
        budget_list = [float(b) for b in budgets.split(",") if b.strip()]
        context_list = [int(c) for c in contexts.split(",") if c.strip()]
    except ValueError:
        raise TailleError("--budgets and --contexts are comma-separated numbers (4,6,8,12 and 2048,8192)") from None
    result = bench_gguf(gguf, prompt=prompt, decode=decode, n_ctx=ctx, repeats=repeats, threads=threads)
    result["fit"] = fit_table(read_shape(gguf), context_list, budget_list, result["compute_bytes"], ctx)
    if json_out:
        print(json.dumps(result, indent=1))
        return
    r = result
    _print_table(f"{gguf} ({r['arch']}, {r['quant']}, {r['params'] / 1e6:.1f}M params, {r['threads']} threads)",
                 ["", "value"], [
                     ["file", f"{r['file_bytes'] / 2**20:.1f} MiB"],
                     [f"prefill ({r['prompt']} tokens)", f"{r['prefill_tok_s']:.1f} tokens/s"],
                     [f"decode ({r['decode']} tokens)", f"{r['decode_tok_s']:.1f} tokens/s"],
                     ["memory (peak rise)", f"{r['memory_rise_bytes'] / 2**20:.1f} MiB"],
                     [f"KV cache at {r['n_ctx']}", f"{r['kv_bytes'] / 2**20:.1f} MiB"],
                 ], right={1})
    rows = []
    for row in result["fit"]:
        cells = [f"{c['bytes'] / 1e9:.2f} GB -> " + (f"{c['fits_gb']:g} GB" if c["fits_gb"] else "none")
                 for c in row["contexts"].values()]
        rows.append([row["quant"] + (" (est.)" if row["estimated"] else ""), *cells])
    _print_table(f"memory needed -> smallest budget of {budgets} GB that holds it",
                 ["quant", *[f"ctx {c}" for c in context_list]], rows, right=set(range(1, len(context_list) + 1)))


@app.command()
def chat(
    model: ModelArg,
    persona: Annotated[Optional[Path], typer.Option(help="Persona YAML (shipped: taille/personas/*.yaml).")] = None,
    ctx: Annotated[int, typer.Option(help="Context window in tokens.")] = 2048,
    max_tokens: Annotated[Optional[int], typer.Option(help="Longest reply (default: the persona's).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature (default: the persona's).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed, for a repeatable conversation.")] = None,
    quant: Annotated[str, typer.Option(help="GGUF type a Hugging Face model is exported to first (cached).")] = "f16",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: every core).")] = None,
) -> None:
    """Talk to a game character in the terminal, on llama.cpp.

    MODEL is a GGUF file, or any model taille loads (exported to GGUF once, kept in the cache). Replies
    stream; the oldest turns are dropped to stay inside --ctx; Ctrl-C stops a reply, Ctrl-C or Ctrl-D at
    the prompt leaves; /reset starts over. Without --persona: the shipped blacksmith.
    """
    from taille.chat.chat import ChatSettings, chat_loop
    from taille.chat.engine import gguf_for
    from taille.chat.persona import load_persona, shipped_personas
    from taille.models.llamacpp import open_gguf

    character = load_persona(persona or shipped_personas() / "blacksmith.yaml")
    path = gguf_for(model, quant)
    logging.getLogger().setLevel(logging.WARNING)  # the conversation, not the log, on the terminal
    llm = open_gguf(path, n_ctx=ctx, threads=threads)
    try:
        import readline  # noqa: F401  line editing and history for input()
    except ImportError:
        pass
    import signal

    # Ctrl-C is part of the chat's interface; a parent that ignored SIGINT (a launcher, a test runner) would
    # pass that on, and Python keeps an inherited "ignore", leaving no way to stop a reply
    signal.signal(signal.SIGINT, signal.default_int_handler)
    chat_loop(llm, character, ChatSettings(max_tokens=max_tokens, temperature=temperature, seed=seed))


@app.command()
def serve(
    model: ModelArg,
    personas: Annotated[Optional[Path], typer.Option(help="Folder of persona YAML files (default: the shipped ones).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    ctx: Annotated[int, typer.Option(help="Context window in tokens (prompt and reply).")] = 2048,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 512,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes.")] = 1 << 20,
    queue: Annotated[int, typer.Option(help="Requests that may wait; more get 429.")] = 64,
    api_key: Annotated[Optional[str], typer.Option(envvar="TAILLE_API_KEY", help="Require 'Authorization: Bearer KEY'.")] = None,
    quant: Annotated[str, typer.Option(help="GGUF type a Hugging Face model is exported to first (cached).")] = "f16",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: every core).")] = None,
) -> None:
    """Serve characters over an OpenAI-compatible API: /v1/models, /v1/chat/completions (plain and streaming).

    `model` in a request names a persona (its name in lower case with dashes, e.g. brenna-ironhand), or the
    bare model file's name for no persona. Requests are answered one at a time from a queue; malformed
    JSON, an unknown persona, a body or max_tokens over the limits, or a prompt over the context get a 4xx
    JSON error. Binds to 127.0.0.1 unless --host says otherwise.
    """
    from taille.chat.persona import load_personas, shipped_personas
    from taille.serve.server import ServeSettings, serve as run

    settings = ServeSettings(host=host, port=port, n_ctx=ctx, max_tokens=max_tokens, max_body=max_body,
                             queue_size=queue, api_key=api_key, threads=threads)
    characters = load_personas(personas or shipped_personas())
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logging.getLogger(__name__).warning("serving on %s without --api-key: anyone who reaches it can use it", host)
    run(model, characters, settings, quant)


def _config_defaults(args: list[str]) -> tuple[list[str], dict]:
    """Take `--config FILE` out of the arguments and return (args, click default_map for the verb)."""
    if "--config" not in args and not any(a.startswith("--config=") for a in args):
        return args, {}
    import yaml

    rest, path = [], None
    it = iter(args)
    for a in it:
        if a == "--config":
            path = next(it, None)
            if path is None:
                raise TailleError("--config needs a YAML file")
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
    verb = next((a for a in rest if not a.startswith("-")), None)
    command = typer.main.get_command(app)
    if verb not in getattr(command, "commands", {}):
        raise TailleError(f"--config needs a verb before it, one of: {', '.join(command.commands)}")
    if not Path(path).is_file():
        raise TailleError(f"--config: no such file: {path}")
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise TailleError(f"--config {path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise TailleError(f"--config {path}: expected a mapping of option names to values")
    known = {p.name: p for p in command.commands[verb].params}
    defaults = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        name = {"json": "json_out"}.get(name, name)
        if name not in known:
            raise TailleError(f"--config {path}: unknown option '{key}' for `taille {verb}`; known: "
                              f"{', '.join(sorted(k for k in known if k != 'help'))}")
        defaults[name] = value
    return rest, {verb: defaults}


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("TAILLE_LOG", "INFO").upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = list(sys.argv[1:] if args is None else args)
    try:
        args, default_map = _config_defaults(args)
        typer.main.get_command(app).main(args=args, prog_name="taille", default_map=default_map)
    except TailleError as e:
        print(f"taille: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("taille: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
