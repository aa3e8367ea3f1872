"""The `taille` command: one entry mapping verbs to typed functions.

Options are declared once, as fields of the stage's settings dataclass (taille/options.py): `_verb` turns
each field into a `--flag` whose help is the field's docstring and whose default is the field's, so the
CLI, a recipe section and the Python API cannot drift apart. A flag left out is not passed at all: the
dataclass fills in its own default. Options that only change what this command prints (--json, --out of
a report) are declared here. Every verb also takes `--config FILE.yaml`: a mapping of option names
(dashes or underscores) to values, which flags given on the command line override.

User mistakes end as one `taille: error: ...` line and exit status 2, never a traceback; Ctrl-C exits 130.
The work lives in the stage packages, imported lazily so `taille -h` stays fast.
"""

from __future__ import annotations

import dataclasses
import inspect
import keyword
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from taille.errors import TailleError
from taille.options import field_docs, field_types, flag, parse_texts, text_parser

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Cut a large language model down to a small one that keeps its quality, and run it on a PC.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", help="Hub id (org/name[@revision]), local Hugging Face folder, .gguf file, or an embedded "
    "name (smollm2-135m-instruct).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


# --- flags from settings dataclasses ----------------------------------------------------------------


def _shown(value, annotation) -> str | bool:
    """How a field's default reads in --help."""
    if value is None or value == () or value == []:
        return False
    parser = text_parser(annotation)
    if isinstance(value, int) and not isinstance(value, bool) and parser is not None and parser.metavar == "N":
        for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
            if value >= size and value % (size // 10 or 1) == 0:
                return f"{value / size:g}{unit}"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def _unoptional(annotation):
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _options(cls, skip: set[str], prefix: tuple = ()) -> list[tuple[inspect.Parameter, tuple]]:
    """One typer option per field of `cls` (nested settings dataclasses flattened), with the path of the
    value inside the settings: [(parameter, ("loss", "kind")), ...]."""
    docs, types, out = field_docs(cls), field_types(cls), []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        annotation = types[f.name]
        plain = _unoptional(annotation)
        if dataclasses.is_dataclass(plain):
            out += _options(plain, skip, prefix + (f.name,))
            continue
        name = f.metadata.get("flag", f.name)  # the flag's word; the parameter's, unless a Python keyword (--from)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        parser = text_parser(annotation)
        if parser is not None and parser.parse is parse_texts:
            cli_type, metavar = Optional[list[str]], parser.metavar  # repeatable: --ppl a --ppl b
        elif parser is not None:
            cli_type, metavar = Optional[str], parser.metavar
        elif plain is bool:
            cli_type, metavar = Optional[bool], None
        else:
            cli_type, metavar = Optional[plain], None
        decls = [f"{flag(name)}/--no-{name.replace('_', '-')}"] if plain is bool else [flag(name)]
        option = typer.Option(*decls, help=docs.get(f.name, ""), metavar=metavar, envvar=f.metadata.get("envvar"),
                              show_default=False if required else _shown(default, annotation))
        param = inspect.Parameter(f.name if keyword.iskeyword(name) else name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[cli_type, option],
                                  default=... if required else None)
        out.append((param, prefix + (f.name,)))
    return out


def _settings(cls, values: dict):
    """Build a settings object from the flags given (nested dicts for nested settings)."""
    for f in dataclasses.fields(cls):
        plain = _unoptional(field_types(cls)[f.name])
        if dataclasses.is_dataclass(plain) and f.name in values:
            values[f.name] = _settings(plain, values[f.name])
        elif dataclasses.is_dataclass(plain) and f.default_factory is dataclasses.MISSING and f.default is dataclasses.MISSING:
            values[f.name] = _settings(plain, {})
    return cls(**values)


def _verb(name: str | None = None, group=None):
    """Register `fn` as `taille NAME`. Parameters of `fn` annotated with a settings dataclass become one
    flag per field of it; `fn`'s other parameters are declared as usual (and, when a settings class has a
    field of the same name, such as MODEL, are passed to it too)."""

    def decorate(fn):
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if not dataclasses.is_dataclass(p.annotation)]
        settings = {p.name: p.annotation for p in signature.parameters.values() if dataclasses.is_dataclass(p.annotation)}
        own_names = {p.name for p in own}
        flags = [(param, key, path) for key, cls in settings.items() for param, path in _options(cls, own_names)]

        def command(**kwargs):
            call = {p.name: kwargs[p.name] for p in own}
            for key, cls in settings.items():
                values = {n: call[n] for n in own_names if n in {f.name for f in dataclasses.fields(cls)}}
                for param, owner, path in flags:
                    if owner == key and kwargs.get(param.name) is not None:
                        node = values
                        for part in path[:-1]:
                            node = node.setdefault(part, {})
                        node[path[-1]] = kwargs[param.name]
                call[key] = _settings(cls, values)
            return fn(**call)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + [p for p, _, _ in flags]
        params.sort(key=lambda p: p.default is not inspect.Parameter.empty and p.default is not ...)  # required first
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__, command.__name__ = fn.__doc__, fn.__name__
        return (group or app).command(name)(command)

    return decorate


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


# --- verbs ------------------------------------------------------------------------------------------


@app.command()
def info(model: ModelArg, json_out: JsonOpt = False) -> None:
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


from taille.bench.config import BenchSettings  # noqa: E402  (settings modules are light: no torch)
from taille.characters.prefer import PreferSettings  # noqa: E402
from taille.characters.settings import CardSettings  # noqa: E402
from taille.chat.chat import ChatSettings  # noqa: E402
from taille.data.select import SelectSettings  # noqa: E402
from taille.distill.config import CorrectConfig, DistillConfig, TeacherCacheConfig  # noqa: E402
from taille.eval.config import EvalSettings  # noqa: E402
from taille.export.config import ExportSettings  # noqa: E402
from taille.generate.generate import GenerateSettings  # noqa: E402
from taille.prune.config import ImportanceConfig, PruneConfig  # noqa: E402
from taille.search.plan import PlanSettings  # noqa: E402
from taille.search.search import SearchSettings  # noqa: E402
from taille.serve.server import ServeSettings  # noqa: E402


@_verb("eval")
def eval_(
    settings: EvalSettings,
    models: Annotated[list[str], typer.Argument(metavar="MODEL...", help="One or more models (see `taille info -h`).",
                                                show_default=False)],
    json_out: JsonOpt = False,
    out: Annotated[Optional[Path], typer.Option(help="Folder for eval.md, eval.json and eval.png.")] = None,
) -> None:
    """Evaluate models side by side: perplexity, zero-shot tasks, speed, memory, KL to a reference.

    Perplexity uses a sliding window: windows of --window tokens start every --stride tokens and each
    token is scored once, in the first window that gives it context. Shakespeare is read from its
    held-out plays unless a split is named (shakespeare:train). Tasks run through lm-evaluation-harness on
    the model in memory, with its standard prompts and metrics (acc, acc_norm, perplexity); the table shows
    acc_norm where a task has it.
    """
    from taille.eval.run import evaluate, markdown, write_report

    report = evaluate(models, settings, out)
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


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="The model (see `taille info -h`).", show_default=False)]


@_verb()
def importance(cfg: ImportanceConfig, model: ModelOpt) -> None:
    """Score heads, MLP neurons, hidden channels and layers by their activations (Minitron).

    One streaming pass of forward hooks over the calibration blocks: per head the input of o_proj, per
    neuron the input of down_proj, per hidden channel the outputs of the norms feeding each block and the
    final norm; mean of |x| over the sequence, then L2 over the batch. Per layer and per contiguous block:
    block importance 1 - cos(input, output); with --depth-metric ppl, the held-out loss without it.
    """
    from taille.prune.prune import run_importance

    folder = run_importance(cfg)
    summary = json.loads((folder / "importance.json").read_text())
    print(f"scores of {model} on {summary.get('data')}: {summary['samples']} blocks x {summary['seq_len']} tokens "
          f"in {summary['seconds']} s -> {folder}")
    if summary.get("layers_by_bi"):
        print(f"layers by block importance, least important first: {summary['layers_by_bi']}")
    if summary.get("layers_by_loss"):
        print(f"layers by loss without them, least important first: {summary['layers_by_loss']}")


@_verb()
def prune(cfg: PruneConfig, model: ModelOpt) -> None:
    """Prune a model to a target size or shape and save a standard Hugging Face checkpoint.

    Widths stay equal in every layer, so the output has a standard config that plain
    AutoModelForCausalLM.from_pretrained loads. Query heads are pruned evenly inside each KV group;
    head_dim never changes. A --params/--ratio target picks, among the shapes within --tolerance, the one
    that cuts the chosen axes most evenly.
    """
    from taille.prune.prune import run_prune

    record = run_prune(cfg)
    b, a = record["shape_before"], record["shape_after"]
    _print_table(f"{model} -> {cfg.out}", ["", "before", "after"], [
        [k, b[k], a[k]] for k in ("layers", "hidden", "ffn", "heads", "kv_heads")] + [
        ["parameters", f"{record['params_before']:,}", f"{record['params_after']:,}"]], right={1, 2})


@_verb()
def distill(cfg: DistillConfig) -> None:
    """Distil a teacher into a student: forward KL on the logits at temperature 1 (Minitron).

    AdamW, linear warm-up then cosine to --min-lr, gradient clipping and accumulation; bf16 autocast where
    the hardware has fast bf16, with fp32 weights and optimizer state. Logits are computed in slices of
    tokens and rebuilt in backward, so no (batch, seq, vocab) tensor is ever held. Without --teacher it
    trains on the data's next tokens (--ce-weight > 0). Runs unchanged under `accelerate launch` or
    `torchrun`: DDP, or FSDP2 with --strategy fsdp or an FSDP `accelerate config` (recipes/accelerate/).
    Checkpoints (safetensors and JSON) are written atomically every --save-every steps; --resume continues
    with the same data order and optimizer state, on the same or another number of processes.
    """
    import os

    from taille.distill.train import distill as run

    record = run(cfg)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(f"distilled {record['tokens']:,} tokens in {record['steps']} steps ({record['precision']}, "
              f"{record['processes']} process(es), {record['strategy']}); final loss {record['final_loss']:.4f} "
              f"-> {cfg.out}")


@_verb()
def correct(cfg: CorrectConfig) -> None:
    """Teacher correction: lightly fine-tune the teacher on the distillation data (cross-entropy, low LR).

    When the teacher's own training data is out of reach, this adapts it to the data the student will be
    distilled on (Minitron: >6% lower validation loss after distillation). Same loop as `distill`.
    """
    from taille.distill.train import distill as run

    record = run(cfg.distill_config())
    print(f"corrected teacher: {record['tokens']:,} tokens, final loss {record['final_loss']:.4f} -> {cfg.out}")


@_verb("teacher-cache")
def teacher_cache(cfg: TeacherCacheConfig) -> None:
    """Store a teacher's top-K next-token distributions over a corpus, once, for `distill --teacher-cache`.

    Per position: the K largest log-probabilities (fp16), their token ids (int32) and the log of the
    probability mass left outside them, in memory-mapped files with the token blocks themselves. With
    --from, a cache of a larger K gives one of a smaller K in seconds (compare several K for one teacher pass).
    """
    from taille.distill.cache import build_cache, shrink_cache
    from taille.models.load import load_model, resolve_device
    from taille.models.precision import resolve_precision

    if cfg.from_cache is not None:
        folder = shrink_cache(cfg.from_cache, cfg.out, cfg.top_k)
    else:
        model, tokenizer = load_model(cfg.teacher, dtype=cfg.dtype, device=cfg.device)
        folder = build_cache(model, tokenizer, cfg.data, cfg.out, cfg.top_k, cfg.seq_len, cfg.tokens, cfg.batch_size,
                             resolve_precision(cfg.precision, resolve_device(cfg.device)), temperature=cfg.temperature,
                             sampling=cfg.sampling, seed=cfg.seed or 0)
    meta = json.loads((folder / "meta.json").read_text())
    kept = f"{cfg.top_k} draws" if meta.get("sampling") == "random" else f"top-{cfg.top_k}"
    print(f"cached {meta['blocks']} blocks x {meta['seq_len']} tokens of {meta['data']}, {kept}: "
          f"{meta['bytes'] / 2**20:,.1f} MiB in {meta['seconds']} s -> {folder}")


@_verb()
def select(cfg: SelectSettings) -> None:
    """Keep the training text where the teacher is furthest ahead of a small model (MiniPLM's difference sampling).

    Scores --pool x --tokens tokens of --data, block by block, by the mean of log p_teacher - log p_reference
    per token, and writes the best --tokens of them to OUT (JSONL that `distill --data` reads, alone or in a
    mixture) with OUT.meta.json. With the pruned student as --reference: the text pruning damaged most.
    """
    from taille.data.select import select as select_blocks

    meta = select_blocks(cfg)
    kept, dropped = meta["kept"], meta["dropped"]
    print(f"kept {kept['blocks']} of {meta['pool_blocks']} blocks of {cfg.seq_len} tokens (mean score {kept['mean']:.3f}, "
          f"dropped {dropped['mean']:.3f}) in {meta['seconds']} s -> {cfg.out}")


@_verb()
def plan(cfg: PlanSettings, model: ModelArg, json_out: JsonOpt = False) -> None:
    """List the shapes a model could be pruned to for a budget, from its config alone (no weights); with
    --distill, the GPU memory of distilling it into a student.

    Layers (down to half), hidden in multiples of 64 (or of the head count where transformers needs it),
    MLP in multiples of 256, query heads per KV group; exact parameter counts, weight size per
    quantization and the fp16 KV cache at --context. Minitron's width recipe comes first: shapes that keep
    every layer, the most even cut of the widths first; then shapes that also drop layers, the fewest first.

    --distill: MODEL is the teacher (offline, a folder holding its config.json), --student the student (a
    folder, or a shape such as hidden=3072,ffn=9216), or --recipe takes both shape and batch from a recipe.
    For DDP, FSDP (student sharded; the teacher too) and a teacher cache: the weights, gradients, AdamW state,
    activations, logit slices and the rest one GPU holds at the step's peak, and the fewest GPUs that fit.
    """
    if cfg.distill:
        _plan_distill(model, cfg.training, json_out)
        return
    from taille.models.load import load_config
    from taille.search.plan import GiB, plan as make_plan

    candidates = make_plan(load_config(model), cfg.params, cfg.memory / GiB if cfg.memory else None, cfg.quant,
                           cfg.context, cfg.tolerance)
    if json_out:
        print(json.dumps([c.to_dict() for c in candidates], indent=1))
        return
    if len(candidates) == 1 and candidates[0].balance == 0:  # the whole model fits: no shape to list
        c = candidates[0]
        print(f"{model} fits {cfg.memory / GiB:g} GiB unpruned: {c.weights_gib[cfg.quant]:.2f} GiB of {cfg.quant} weights "
              f"+ {c.kv_cache_gib:.2f} GiB of KV cache at {cfg.context} tokens; nothing to cut")
        return
    rows = [[c.shape.layers, c.shape.hidden, c.shape.ffn, f"{c.shape.heads}/{c.shape.kv_heads}", f"{c.params:,}",
             *[f"{v:.2f}" for v in c.weights_gib.values()], f"{c.kv_cache_gib:.2f}", f"{c.balance:.2f}"]
            for c in candidates[:cfg.top]]
    _print_table(f"{len(candidates)} candidate shapes for {model} (first {min(cfg.top, len(candidates))})",
                 ["layers", "hidden", "MLP", "heads/kv", "params", *[f"{q} GiB" for q in candidates[0].weights_gib],
                  f"KV@{cfg.context} GiB", "max cut"], rows, right=set(range(11)))


def _plan_distill(model: str, settings, json_out: bool) -> None:
    from taille.distill.memory import GiB, MAX_GPUS, SETUPS, plan_memory, resolve

    teacher, student, settings = resolve(model, settings)
    result = plan_memory(teacher, student, settings)
    if json_out:
        print(json.dumps({"model": model, **result.to_dict()}, indent=1))
        return

    def gib(n: int) -> str:
        return "-" if not n else f"{n / GiB:,.1f}" if n >= 10 * GiB else f"{n / GiB:.2f}"

    s, columns = result.settings, result.columns
    parts = [p for p in columns[0].parts if any(c.parts[p] for c in columns)]
    rows = [[p, *[gib(c.parts[p]) for c in columns]] for p in parts]
    rows.append(["peak (at)", *[f"{gib(c.peak)} ({c.moment})" for c in columns]])
    rows.append([f"fits {s['gpu_memory'] / GiB:g} GiB", *["yes" if c.peak <= s["gpu_memory"] else "no" for c in columns]])
    rows.append(["fewest GPUs that fit", *[str(result.fewest[c.strategy].gpus) if result.fewest[c.strategy] else
                                           f"> {MAX_GPUS}" if c.strategy.startswith("fsdp") else "never" for c in columns]])
    print(f"{model} ({_human(teacher.params)}) -> student ({_human(student.params)}; hidden {student.hidden}, MLP "
          f"{student.ffn}, {student.heads}/{student.kv_heads} heads, {student.layers} layers): batch {s['batch_size']} x "
          f"{s['seq_len']}, grad-accum {s['grad_accum']}, {s['precision']}"
          + (", activation checkpointing" if s["activation_checkpointing"] else "") + f", {s['device']}")
    _print_table(f"GiB per GPU on {s['gpus']} GPU{'s' * (s['gpus'] > 1)}", ["", *[SETUPS[c.strategy] for c in columns]],
                 rows, right=set(range(1, len(columns) + 1)))
    if result.smallest is not None:
        c = result.smallest
        print(f"smallest setup that fits {s['gpu_memory'] / GiB:g} GiB per GPU: {SETUPS[c.strategy]} on {c.gpus} "
              f"GPU{'s' * (c.gpus > 1)} ({gib(c.peak)} GiB each)")
    else:
        print(result.advice)


@_verb()
def generate(cfg: GenerateSettings) -> None:
    """Sample a distillation corpus from the teacher: prompts in, teacher answers out, as JSONL for --data.

    Each prompt is answered in rounds until --tokens answer tokens are kept; answers too short, not in
    --language, or exact / near duplicates of earlier ones are dropped. Records are appended as they come:
    run it again to continue (done prompt rounds are skipped). A teacher without a chat template gets
    plain continuations (text records), and says so; --plain asks for them from any teacher, and --prompts free
    opens each record with a random word of the teacher's vocabulary (data-free generation). OUT.meta.json:
    engine, tokens/s, what was filtered.
    With --personas DIR: role-play conversations instead, the teacher answering in character to player lines
    of several kinds (knowledge, small talk, goals, lines that try to make it break), filtered for breaks.
    """
    from taille.generate.generate import generate as run

    meta = run(cfg)
    if cfg.personas is not None:
        print(f"{meta['conversations_total']:,} conversations over {meta['cards']} cards, {meta['tokens_kept']:,} "
              f"reply tokens -> {cfg.out} ({meta['engine']}; {meta['generation_tokens_per_s']} generated tokens/s "
              f"this run; replies filtered: {', '.join(f'{k} {v}' for k, v in meta['filtered_replies_this_run'].items() if v) or 'none'})")
        return
    print(f"{meta['records']:,} records, {meta['tokens_kept']:,} answer tokens -> {cfg.out} ({meta['engine']}; "
          f"{meta['generation_tokens_per_s']} generated tokens/s this run; duplicate rate "
          f"{meta['duplicate_rate_this_run']})")


@_verb()
def prefer(cfg: PreferSettings) -> None:
    """Teach a distilled character what not to say: DPO on its own out-of-character replies.

    For each assistant turn of a role-play corpus (--data), the student samples --samples replies; the first
    the corpus filters reject (a `never` phrase, an out-of-character marker, a loop) is paired against the
    corpus's in-character teacher reply. Then DPO (TRL's DPOTrainer, the student itself as the reference) with
    --sft-weight x the chosen replies' cross-entropy. OUT: the tuned model, pairs.jsonl(.meta.json), metrics.jsonl.
    """
    from taille.characters.prefer import prefer as run

    record = run(cfg)
    pairs = record["pairs"]
    print(f"{pairs['pairs']:,} pairs from {pairs['turns']:,} turns ({pairs['failed_share']:.1%} of {pairs['draws']:,} "
          f"student draws broke character: {', '.join(f'{k} {v}' for k, v in pairs['failed_draws'].items())}); "
          f"DPO {record['steps']} steps in {record['seconds']} s, final loss {record['final_loss']}, reward accuracy "
          f"{record['final_reward_accuracy']} -> {cfg.out}")


personas_app = typer.Typer(help="Character cards: `taille personas make` composes many for role-play data and "
                             "held-out evaluation.", no_args_is_help=True)
app.add_typer(personas_app, name="personas")


@_verb("make", group=personas_app)
def personas_make(cfg: CardSettings) -> None:
    """Compose --count varied character cards (fantasy, sci-fi, modern) into OUT/train and OUT/heldout.

    The same --count and --seed give the same cards. Which half a card goes to is fixed by its name (about
    a fifth held out), so held-out cards are never seen in training: `taille generate --personas OUT` writes
    role-play data from OUT/train, `taille eval --personas OUT` scores characters on OUT/heldout.
    """
    from taille.characters.cards import write_cards

    counts = write_cards(cfg.out, cfg.count, cfg.seed)
    print(f"{counts['train']} training cards -> {Path(cfg.out) / 'train'}, {counts['heldout']} held-out cards -> "
          f"{Path(cfg.out) / 'heldout'}")


@_verb()
def search(
    settings: SearchSettings,
    model: ModelOpt,
    data: Annotated[str, typer.Option(help="Calibration and distillation text.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Folder: leaderboard.{md,json,png}, winner.yaml, candidates.",
                                      show_default=False)],
    scores: Annotated[Optional[Path], typer.Option(help="Scores from `taille importance` (else computed here).")] = None,
    samples: Annotated[int, typer.Option(help="Calibration blocks, when importance runs here (at importance's block length, in --precision).")] = 128,
) -> None:
    """Architecture search (Minitron): prune each candidate shape near the target and distil each briefly
    from one teacher cache, then rank by held-out loss.

    Importance runs once (or comes from --scores); the teacher runs once, into a top-K cache; every
    candidate gets the same steps. The default width shape is among the candidates when it lies within
    --tolerance, so the leaderboard says whether the search beat it. A search run again skips finished candidates.
    """
    from taille.models.precision import frozen_weights_dtype
    from taille.prune.prune import run_importance
    from taille.search.search import run_search

    if scores is None:
        scores = out / "importance"
        if not (scores / "importance.json").is_file():
            run_importance(ImportanceConfig(model=model, data=data, out=str(scores), samples=samples,
                                            precision=settings.precision,
                                            dtype=frozen_weights_dtype(settings.precision)))
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
    """The main job on the embedded default: the shipped recipe `smollm2-135m-to-90m` (SmolLM2-135M-Instruct
    pruned to ~90M, distilled from the teacher on its role-play, chat and the plays, evaluated against it as a
    model and as a character, exported to GGUF); prints the table and the report's path."""
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
        if report.get("characters"):
            from taille.characters.evaluate import COLUMNS, table_rows

            c = report["characters"]
            print(f"as a game character, on {len(c['cards'])} held-out cards:")
            _print_table("", list(COLUMNS), table_rows({**c, "labels": report.get("labels", {})}),
                         right=set(range(1, len(COLUMNS))))
    card = next(iter(sorted((run / "personas" / "heldout").glob("*.yaml"))), None)
    if (run / "export" / "export.json").is_file():
        for r in json.loads((run / "export" / "export.json").read_text()):
            v = r.get("verify")
            agreement = f", top-1 agreement with PyTorch {v['top1_agreement']:.1%}" if v else ""
            print(f"on-device: {r['out']} ({r['quant']}, {r['bytes'] / 2**20:.1f} MiB{agreement}); talk to it: "
                  f"taille chat {r['out']}" + (f" --persona {card}" if card else ""))
    if (run / "report.html").is_file():
        print(f"report: {run / 'report.html'} (and report.md)")


@_verb()
def export(cfg: ExportSettings, model: ModelArg, json_out: JsonOpt = False) -> None:
    """Write a model for on-device use: GGUF for llama.cpp, or a clean Hugging Face folder.

    GGUF: llama.cpp's own converter writes the weights, tokenizer, special tokens and chat template at 16
    bits, then llama.cpp's quantizer makes --quant (their logs only with --verbose). --verify then loads the
    file in llama.cpp and compares it with the PyTorch model on held-out text: the perplexity ratio and the
    mean KL must stay within what a correct export of that type reaches (measured, see
    taille/models/quant.py); top-1 agreement is reported beside them. Exit status 3 when verification fails.
    """
    if cfg.format == "hf":
        from taille.export.hf import export_hf

        record = export_hf(model, cfg.out, cfg.dtype)
        print(json.dumps(record, indent=1) if json_out else f"wrote {cfg.out}: {', '.join(record['files'])}")
        return
    from taille.export.gguf import export_gguf
    from taille.export.verify import verify_gguf

    record = export_gguf(model, cfg.out, cfg.quant, name=cfg.name, pre_tokenizer=cfg.pre_tokenizer, verbose=cfg.verbose)
    if cfg.verify:
        record["verify"] = verify_gguf(cfg.out, model, cfg.verify_data, cfg.verify_blocks, cfg.verify_len, quant=cfg.quant)
    if json_out:
        print(json.dumps(record, indent=1))
    else:
        types = ", ".join(f"{k} {v}" for k, v in sorted(record["tensor_types"].items(), key=lambda kv: -kv[1]))
        print(f"wrote {cfg.out}: {record['bytes'] / 2**20:.1f} MiB, {cfg.quant}, tensors: {types} ({record['seconds']} s)")
        if record["widths_kept_larger"]:
            print(f"  widths not divisible by the {cfg.quant} block, kept at a larger type: "
                  f"{', '.join(record['widths_kept_larger'])}")
        if cfg.verify:
            print(_verify_lines(record["verify"]))
    if cfg.verify and not record["verify"]["passed"]:
        sys.exit(3)


def _verify_lines(v: dict) -> str:
    """The verification result as two lines: the gated numbers beside their limits, then PASS or FAIL."""
    gates = v.get("gates") or {}
    ratio = f"perplexity ratio {v['ppl_ratio']:.4f}" if "ppl_ratio" in v else ""
    if gates.get("max_ppl_ratio"):
        ratio += f" (limit {gates['max_ppl_ratio']})"
    kl = f"mean KL {v['mean_kl']:.5f}" + (f" (limit {gates['max_mean_kl']})" if gates.get("max_mean_kl") else "")
    template = {True: 'same', False: 'DIFFERENT', None: 'absent'}[v['chat_template_same']]
    return (f"verify on {v['positions']} positions of {v['data']}: {ratio}, {kl}, perplexity PyTorch "
            f"{v['ppl_pytorch']:.2f} / llama.cpp {v['ppl_gguf']:.2f}, top-1 agreement {v['top1_agreement']:.2%}; "
            f"tokenizer same on {v['tokenizer_same']} texts; chat template {template}\n"
            f"verify: {'PASS' if v['passed'] else 'FAIL: ' + '; '.join(v.get('failed') or [])}")


@_verb()
def bench(
    cfg: BenchSettings,
    gguf: Annotated[Path, typer.Argument(metavar="MODEL.gguf", help="The GGUF file.", show_default=False)],
    json_out: JsonOpt = False,
) -> None:
    """llama.cpp speed and memory of a GGUF file on this machine, and which PCs it fits.

    Prefill and decode tokens/s come from llama.cpp's own counters (what llama-bench reports); memory is the
    process's peak rise. The fit table adds the KV cache (f16) of each context length to the weights at
    each quantization (this file's own type measured, the others estimated from its parameter count) and
    names the smallest memory budget that holds it.
    """
    from taille.bench.bench import bench_gguf, fit_table, read_shape

    result = bench_gguf(gguf, prompt=cfg.prompt, decode=cfg.decode, n_ctx=cfg.ctx, repeats=cfg.repeats,
                        threads=cfg.threads)
    result["fit"] = fit_table(read_shape(gguf), list(cfg.contexts), list(cfg.budgets), result["compute_bytes"], cfg.ctx)
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
    _print_table(f"memory needed -> smallest budget of {','.join(f'{b:g}' for b in cfg.budgets)} GB that holds it",
                 ["quant", *[f"ctx {c}" for c in cfg.contexts]], rows, right=set(range(1, len(cfg.contexts) + 1)))


QuantOpt = Annotated[str, typer.Option(help="GGUF type a Hugging Face model is exported to first (cached).")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="CPU threads (default: every core).")]


@_verb()
def chat(
    settings: ChatSettings,
    model: ModelArg,
    persona: Annotated[Optional[Path], typer.Option(help="Persona YAML (shipped: taille/personas/*.yaml).")] = None,
    ctx: Annotated[int, typer.Option(help="Context window in tokens.")] = 2048,
    quant: QuantOpt = "f16",
    threads: ThreadsOpt = None,
) -> None:
    """Talk to a game character in the terminal, on llama.cpp.

    MODEL is a GGUF file, or any model taille loads (exported to GGUF once, kept in the cache). Replies
    stream; the oldest turns are dropped to stay inside --ctx; Ctrl-C stops a reply, Ctrl-C or Ctrl-D at
    the prompt leaves; /reset starts over. Without --persona: the shipped blacksmith.
    """
    from taille.chat.chat import chat_loop
    from taille.chat.engine import gguf_for
    from taille.chat.persona import load_persona, shipped_personas
    from taille.models.llamacpp import open_gguf
    from taille.models.quant import get_quant

    get_quant(quant)
    if ctx < 16 or (threads is not None and threads < 1):
        raise TailleError("--ctx must be at least 16 and --threads at least 1")
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
    chat_loop(llm, character, settings)


@_verb()
def serve(
    settings: ServeSettings,
    model: ModelArg,
    personas: Annotated[Optional[Path], typer.Option(help="Folder of persona YAML files (default: the shipped ones).")] = None,
    quant: QuantOpt = "f16",
) -> None:
    """Serve characters over an OpenAI-compatible API: /v1/models, /v1/chat/completions (plain and streaming).

    `model` in a request names a persona (its name in lower case with dashes, e.g. brenna-ironhand), or the
    bare model file's name for no persona. Requests wait in a bounded queue for one of --parallel engine slots; malformed
    JSON, an unknown persona, a body or max_tokens over the limits, or a prompt over the context get a 4xx
    JSON error; a request not started within --timeout seconds gets 503. A client that disconnects,
    streaming or not, stops its generation. Binds to 127.0.0.1 unless --host says otherwise. A card with
    `actions` (a JSON schema) gets replies constrained to it; a request's `user` keeps a player's
    conversation in one engine slot; cards added or changed in the folder are served without a restart.
    """
    from taille.chat.persona import load_personas, shipped_personas
    from taille.models.quant import get_quant
    from taille.serve.server import serve as run

    get_quant(quant)
    folder = personas or shipped_personas()
    load_personas(folder)  # a bad folder is one clear line before anything loads
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        logging.getLogger(__name__).warning("serving on %s without --api-key: anyone who reaches it can use it",
                                            settings.host)
    run(model, folder, settings, quant)  # the folder, not the cards: a card changed while serving is read again


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
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise TailleError(f"--config {path}: not valid YAML: {' '.join(str(e).split())}") from None
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
        multiple = getattr(known[name], "multiple", False)
        if isinstance(value, list) and not multiple:  # a YAML list for a comma-list flag (tasks, axes, block_sizes)
            value = ",".join(map(str, value))
        elif multiple and not isinstance(value, list):  # one text for a repeatable flag (ppl)
            value = [value]
        defaults[name] = value
    return rest, {verb: defaults}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(args: list[str] | None = None) -> None:
    """Run the CLI. A user mistake (a TailleError, a bad flag, a file that cannot be read) is one
    `taille: error:` line and exit 2; Ctrl-C is exit 130; TAILLE_DEBUG=1 shows the traceback instead."""
    try:  # newer typer carries its own copy of click, whose exceptions are the ones raised
        from typer._click import exceptions as click
    except ImportError:
        from click import exceptions as click

    logging.basicConfig(level=os.environ.get("TAILLE_LOG", "INFO").upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = list(sys.argv[1:] if args is None else args)
    debug = bool(os.environ.get("TAILLE_DEBUG"))
    try:
        args, default_map = _config_defaults(args)
        command = typer.main.get_command(app)
        code = command.main(args=args, prog_name="taille", default_map=default_map, standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into exit status 130 itself, silently
            raise KeyboardInterrupt
        sys.exit(code if isinstance(code, int) else 0)
    except click.NoArgsIsHelpError as e:  # `taille` or `taille VERB` alone: the help, not an error
        print(e.ctx.get_help())
        sys.exit(0)
    except click.UsageError as e:
        verb = f" {e.ctx.info_name}" if e.ctx is not None and e.ctx.parent is not None else ""
        print(f"taille: error: {_one_line(e.format_message())} (see `taille{verb} -h`)", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as e:
        print(f"taille: error: {_one_line(e.format_message())}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("taille: interrupted", file=sys.stderr)
        sys.exit(130)
    except TailleError as e:
        if debug:
            raise
        print(f"taille: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except (OSError, UnicodeDecodeError) as e:  # a file that is missing, unreadable, or not text
        if debug:
            raise
        print(f"taille: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
