"""`taille distill`: train a student on a frozen teacher's logits (Minitron: forward KL at temperature 1).

One code path for 1 or N processes: `accelerate launch` or `torchrun` starts N copies of this same loop;
the student is replicated with DDP or sharded with FSDP2 (--strategy, or `accelerate config`; see
taille/distill/sharding.py). The order of
samples is a pure function of (seed, step), and each process takes its slice of the global batch, so a
run on N processes sees the same data as on one, and a resumed run the same as an uninterrupted one.

Per optimizer step: global batch = batch_size x grad_accum x processes blocks of seq_len tokens; the loss
is summed over real tokens and divided by the global token count (a constant, no communication).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.profiler import record_function

from taille.distill.checkpoint import _atomic_write, latest_checkpoint, save_checkpoint
from taille.distill.sharding import (
    clip_gradients, kept_gathered, parameter_order, resolve_strategy, restore, save_fsdp, shard, tied_groups)
from taille.distill.hidden import cosine_loss_sum, layer_outputs
from taille.distill.config import TRACKERS, DistillConfig, LossConfig  # noqa: F401  (re-exported)
from taille.distill.losses import distill_loss
from taille.distill.onpolicy import reply_marker
from taille.errors import TailleError
from taille.models.lm import hidden_states, logit_softcap

log = logging.getLogger(__name__)

# Fields that may change between a run and its resumption without changing what it computes.
RESUME_FREE = ("out", "resume", "eval_every", "eval_data", "eval_tokens", "save_every", "log_every", "progress", "report_to",
               "strategy", "shard_teacher", "sharded_checkpoints", "activation_checkpointing")
PER_PROCESS = ("batch_size", "grad_accum")
"""Free on resume when the checkpoint records its global batch, which must then stay the same."""


def lr_at(step: int, total: int, cfg: DistillConfig) -> float:
    """Linear warm-up to lr over `warmup` steps, then cosine to min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


class Trunk(torch.nn.Module):
    """The student as DDP and FSDP see it: the whole causal LM (all parameters registered) and the
    --hidden-layers projections to the teacher's width. Its forward computes the loss itself (the LM head
    applied in slices): under FSDP the head's whole weight exists only inside the root's forward."""

    def __init__(self, lm, taps: list[int] = (), projections: list[torch.nn.Module] = ()):
        super().__init__()
        self.lm = lm
        self.taps = list(taps)
        self.projections = torch.nn.ModuleList(projections)

    def forward(self, input_ids, teacher: dict | None = None, loss_cfg: LossConfig | None = None, evaluate: bool = False,
                sample: int = 0, generators: list | None = None, forced: torch.Tensor | None = None,
                weights: torch.Tensor | None = None):
        """(loss sum, hidden-state loss sum) over the block's next-token positions (`weights` (B, T - 1): 1 where
        a target counts, --loss-on replies; None: every one), or with `evaluate` the
        held-out (NLL sum, KL sum). `teacher`: hidden (N, H_t) final states at the same positions, head,
        softcap, top (a cache batch) and states (its tapped layers' outputs, one per projection).
        With `sample` N: the (B, N) tokens the student samples after `input_ids`, one generator a row
        (on-policy distillation; here because under FSDP the whole head and embeddings exist only inside
        this forward); `forced` as sample_tail takes it."""
        if sample:
            from taille.distill.onpolicy import sample_tail

            was_training = self.lm.training
            self.lm.eval()  # the student samples as it will be used: no dropout, whatever the family's config
            try:
                with kept_gathered(self.lm):
                    return sample_tail(self.lm, input_ids, sample, generators, forced)
            finally:
                self.lm.train(was_training)
        teacher = teacher or {}
        captured = {}
        with record_function("taille.student_forward"), layer_outputs(self.lm, self.taps, captured):
            final = hidden_states(self.lm, input_ids)  # (B, T, H)
        hidden = final[:, :-1].reshape(-1, final.shape[-1])  # positions that predict the next token
        targets = input_ids[:, 1:].reshape(-1)
        head, softcap = _head(self.lm)
        if evaluate:
            return held_out_sums(hidden, head, softcap, targets, teacher.get("hidden"), teacher.get("head"),
                                 teacher.get("softcap"))
        with record_function("taille.loss_forward"):
            mask = torch.ones_like(targets) if weights is None else weights.reshape(-1)
            loss_sum, _ = distill_loss(hidden, head, targets, mask, loss_cfg, teacher.get("hidden"),
                                       teacher.get("head"), teacher_top=teacher.get("top"), softcap=softcap,
                                       teacher_softcap=teacher.get("softcap"))
        hidden_sum = loss_sum.new_zeros(())
        if self.taps:
            with record_function("taille.hidden_loss"):  # the same positions as the logit loss
                hidden_sum = cosine_loss_sum([proj(captured[i])[:, :-1] for proj, i in zip(self.projections, self.taps)],
                                             [t[:, :-1] for t in teacher["states"]])
        return loss_sum, hidden_sum


def held_out_sums(hidden, head, softcap, targets, t_hidden=None, t_head=None, t_softcap=None):
    """(NLL sum, KL(teacher || student) sum) in fp64 over rows of final hidden states (N, H), the heads
    applied a slice of rows at a time (KL 0 without a teacher)."""
    import torch.nn.functional as F

    from taille.distill.losses import LOGIT_ELEMENTS

    V = head.shape[0]
    chunk = max(1, LOGIT_ELEMENTS.get(hidden.device.type, LOGIT_ELEMENTS["cuda"]) // V)
    nll = torch.zeros((), dtype=torch.float64, device=hidden.device)
    kl = torch.zeros((), dtype=torch.float64, device=hidden.device)

    def capped(logits, cap):
        logits = logits.float()
        return torch.tanh(logits / cap) * cap if cap else logits

    for i in range(0, hidden.shape[0], chunk):
        logp = F.log_softmax(capped(hidden[i:i + chunk] @ head.T, softcap), dim=-1)
        nll -= logp.gather(-1, targets[i:i + chunk, None]).sum(dtype=torch.float64)
        if t_hidden is not None:
            t_logp = F.log_softmax(capped(t_hidden[i:i + chunk] @ t_head.T, t_softcap)[:, :V], dim=-1)
            kl += (t_logp.exp() * (t_logp - logp)).sum(dtype=torch.float64)
    return nll, kl


def prune_record(folder: str) -> dict:
    """The `kept` part of a student's pruning record (taille.json of `prune`, or of a `distill` of one)."""
    path = Path(folder) / "taille.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    while record and "kept" not in record:
        record = record.get("pruned_from") or {}
    return record.get("kept", {}) if record else {}


def _head(model):
    """(LM head weight (V, H), soft cap or None): what the sliced loss applies itself."""
    from taille.models.arch import get_arch

    return model.get_submodule(get_arch(model.config).lm_head).weight, logit_softcap(model.config)


def check_tokenizers(teacher_tok, student_tok, teacher_vocab: int, student_vocab: int) -> None:
    """Teacher and student must share the tokenizer; the teacher's vocabulary may only be padded larger."""
    t, s = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t != s:
        differing = sorted(set(t.items()) ^ set(s.items()))[:5]
        raise TailleError(f"teacher and student tokenizers differ ({len(t)} vs {len(s)} tokens; e.g. {differing}); "
                          "distillation compares distributions token by token, so they must share one")
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(teacher_tok, name) != getattr(student_tok, name):
            raise TailleError(f"teacher and student disagree on {name}: {getattr(teacher_tok, name)} vs "
                              f"{getattr(student_tok, name)}")
    if teacher_vocab < student_vocab:
        raise TailleError(f"the teacher's output vocabulary ({teacher_vocab}) is smaller than the student's "
                          f"({student_vocab})")


def config_differences(saved: dict, current: dict, per_process_free: bool = False) -> list[str]:
    """Settings that differ between a checkpoint and this run. A setting the checkpoint does not record
    (an option added since it was written) counts as its default, which is what that run used.
    `per_process_free`: the checkpoint records its global batch (checked on its own), so the per-process
    batch may change with the number of processes."""
    defaults = {f.name: f.default for f in fields(DistillConfig) if f.default is not MISSING}
    saved = {**{k: v for k, v in defaults.items() if k in current}, **saved}
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUME_FREE or (per_process_free and key in PER_PROCESS):
            continue
        if saved.get(key) != current.get(key):
            out.append(f"{key}: {saved.get(key)!r} in the checkpoint vs {current.get(key)!r} now")
    return out


# --- the loop ---------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_student(run: "Run") -> dict:
    """Held-out NLL (and KL to a live teacher) over run.eval_blocks, through the (wrapped) trunk: every
    process computes all of it, as FSDP's gathers need every process in each forward."""
    from taille.data.tokens import batches
    from taille.models.precision import autocast

    nll = torch.zeros((), dtype=torch.float64, device=run.device)
    kl = torch.zeros((), dtype=torch.float64, device=run.device)
    run.trunk.eval()
    for ids in batches(run.eval_blocks, run.cfg.batch_size, run.device):
        with autocast(run.precision, run.device.type):
            n, k = run.trunk(ids, teacher=_teacher_outputs(run, ids), evaluate=True)
        nll += n
        kl += k
    run.trunk.train()
    n = len(run.eval_blocks) * (run.eval_blocks.shape[1] - 1)
    loss = float(nll) / n
    out = {"eval_loss": loss, "eval_ppl": math.exp(loss)}
    if run.teacher is not None:
        out["eval_kl"] = float(kl) / n
    return out


@torch.no_grad()
def _teacher_outputs(run: "Run", ids: torch.Tensor, top=None) -> dict:
    """What the trunk's loss needs from the teacher for a batch: its final hidden states at the positions
    that predict a next token, its head and soft cap, its tapped layers' outputs, or a cache batch."""
    if run.teacher is None:
        return {"top": top}
    t_head, t_softcap = run.heads[2:]
    taps = sorted({t for _, t in run.pairs})
    layers = {}
    with record_function("taille.teacher_forward"), layer_outputs(run.teacher, taps, layers):
        hidden = hidden_states(run.teacher, ids)[:, :-1].reshape(-1, run.teacher.config.hidden_size)
    return {"hidden": hidden, "head": t_head, "softcap": t_softcap, "states": [layers[t] for _, t in run.pairs]}


@dataclass
class Run:
    """Everything a distillation holds between steps, made by `setup`."""

    cfg: DistillConfig
    accelerator: object
    device: torch.device
    precision: str
    student: torch.nn.Module
    tokenizer: object
    teacher: torch.nn.Module | None
    trunk: torch.nn.Module
    optimizer: torch.optim.Optimizer
    blocks: np.ndarray
    """(N, T) training blocks."""
    cache: object | None
    """The teacher cache, or None with a live teacher (or none)."""
    eval_blocks: np.ndarray | None
    source: str
    pairs: list
    """(student layer, teacher layer) pairs of the hidden-state loss."""
    global_batch: int
    total_steps: int
    start_step: int
    state: dict
    """tokens, seconds, loss: what a checkpoint carries besides the weights."""
    resume_from: Path | None
    heads: tuple
    """(student head weight, soft cap, teacher head weight, teacher soft cap): what the sliced loss applies
    (the student's is read again inside the trunk's forward, where FSDP has it whole)."""
    strategy: str = "single"
    """single, ddp or fsdp (taille/distill/sharding.py)."""
    raw_optimizer: torch.optim.Optimizer | None = None
    """The optimizer before accelerate wraps it (what checkpoints read and write)."""
    tied: list = ()
    """Groups of names that share one parameter in the trunk."""
    order: list = ()
    """Every parameter's names, in the optimizer's order (a checkpoint's indices)."""
    reply_marker: list | None = None
    """The chat template's assistant header as token ids, with --on-policy-from reply."""
    replies: object | None = None
    """With --loss-on replies, the ReplyMask of `blocks` (taille/distill/replies.py)."""

    @property
    def n_targets(self) -> int:
        return self.global_batch * (self.cfg.seq_len - 1)  # real tokens per optimizer step (full blocks)


def checkpoint_activations(model) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant checkpoints). transformers calls it
    activation_checkpointing_enable from 5.2x on and gradient_checkpointing_enable before (now a deprecated
    alias); both are in the range taille accepts, so the name is looked up, not assumed."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def check_one_process_per_gpu() -> None:
    """A launch of more processes on this machine than it has GPUs would send the extra ones to a device
    that does not exist (CUDA's "invalid device ordinal" in the middle of the first collective): refuse it
    in one line instead."""
    import torch

    local_rank, local_world = os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE")
    if local_rank is None or not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count()
    if int(local_rank) >= gpus:
        raise TailleError(f"{local_world or int(local_rank) + 1} processes were launched on this machine and it has {gpus} "
                          f"GPU{'s' if gpus > 1 else ''}: launch one process per GPU (torchrun --nproc-per-node {gpus}, "
                          f"accelerate launch --num-processes {gpus}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to "
                          "train on the CPUs")


def setup(cfg: DistillConfig) -> Run:
    """Load the models and data, build the optimizer, and restore a checkpoint when resuming."""
    from accelerate import Accelerator

    from taille.data.mixture import load_blocks
    from taille.data.tokens import load_tokens
    from taille.models.load import load_model, resolve_device
    from taille.models.precision import frozen_weights_dtype, resolve_precision

    # On a machine without an accelerator, cpu=True lets torchrun / accelerate launch form a gloo group.
    trackers = {} if cfg.report_to == "none" else {"log_with": cfg.report_to, "project_dir": cfg.out}
    # before accelerate reads its launch settings: a DeepSpeed one fails there with an ImportError
    strategy = resolve_strategy(cfg.strategy, int(os.environ.get("WORLD_SIZE", "1")))
    check_one_process_per_gpu()
    accelerator = Accelerator(cpu=resolve_device("auto") == "cpu", **trackers)
    device, world = accelerator.device, accelerator.num_processes
    precision = resolve_precision(cfg.precision, device.type)
    out = Path(cfg.out)
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        if (out / "checkpoints").is_dir():  # a folder that held checkpoints and lost them: say so
            log.warning("--resume: %s has no complete checkpoint, starting from step 0", out / "checkpoints")
        else:
            log.info("no checkpoint in %s yet: starting from step 0", out)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    if resume_from is not None:
        saved = json.loads((resume_from / "state.json").read_text())
        diff = config_differences(saved["config"], cfg.to_dict(), per_process_free="global_batch" in saved)
        if diff:
            raise TailleError(f"--resume: {resume_from} was written by another configuration: " + "; ".join(diff))
        if saved.get("global_batch", global_batch) != global_batch:
            raise TailleError(
                f"--resume: {resume_from} was written with a global batch of {saved['global_batch']} blocks "
                f"({saved['processes']} processes x --batch-size x --grad-accum); this run's is {global_batch} "
                f"({world} x {cfg.batch_size} x {cfg.grad_accum}): keep the global batch so the data order stays")
        if saved.get("processes", world) != world:
            log.info("resuming a %d-process run on %d processes (same global batch)", saved["processes"], world)

    torch.manual_seed(cfg.seed)
    student, tokenizer = load_model(cfg.student, dtype="fp32", device=str(device))
    marker = reply_marker(tokenizer) if cfg.on_policy and cfg.on_policy_from == "reply" else None
    student.train()
    teacher = None
    if cfg.teacher and cfg.loss.kd:
        teacher, teacher_tokenizer = load_model(cfg.teacher, dtype=frozen_weights_dtype(precision),
                                                device=str(device))
        teacher.requires_grad_(False)
        check_tokenizers(teacher_tokenizer, tokenizer, teacher.config.vocab_size, student.config.vocab_size)

    cache = None
    with accelerator.main_process_first():
        if cfg.teacher_cache:
            from taille.distill.cache import open_cache

            try:
                cache = open_cache(cfg.teacher_cache, tokenizer)
                cache.check_fits(student.config.vocab_size, cfg.teacher_cache)
                seen = json.dumps(cache.meta, sort_keys=True)
            except TailleError as e:
                if world == 1:
                    raise
                seen = f"error: {e}"  # said on every process at once, below
            blocks = cache.blocks if cache is not None else None
        else:
            blocks = load_blocks(cfg.data, tokenizer, cfg.seq_len, progress=cfg.progress and accelerator.is_main_process,
                                 seed=cfg.seed)
        source = cfg.data or (cache.meta["data"] if cache else "")
    if cfg.teacher_cache:
        _same_on_every_process(accelerator, seen, f"--teacher-cache {cfg.teacher_cache}")
    replies = None
    if cfg.loss_on == "replies":
        from taille.distill.replies import reply_mask

        replies = reply_mask(blocks, tokenizer)
        sample = np.linspace(0, len(blocks) - 1, min(len(blocks), 256)).astype(np.int64)
        plain = dict(zip(replies.names, replies.plain))
        per_source = ", ".join(f"{name} {100 * v:.1f}%{' (no assistant turn: every token)' if plain[name] else ''}"
                               for name, v in replies.shares(sample).items())
        log.info("--loss-on replies: %.1f%% of the targets count (%s; %d blocks spread over the data)",
                 100 * replies.share(sample), per_source, len(sample))
    with accelerator.main_process_first():
        eval_spec = cfg.eval_data
        if eval_spec == "auto":
            from taille.data.mixture import auto_held_out

            eval_spec = auto_held_out(source)
        eval_blocks = None
        if eval_spec:
            eval_stream = load_tokens(eval_spec, tokenizer, split="heldout", max_tokens=cfg.eval_tokens + 1,
                                      progress=False)
            eval_blocks = eval_stream.blocks(min(cfg.seq_len, len(eval_stream) - 1))
    total_steps = max(1, cfg.tokens // (global_batch * cfg.seq_len))

    pairs, projections = [], []
    if cfg.hidden_layers:
        from taille.distill.hidden import parse_pairs, projection

        kept = prune_record(cfg.student)
        pairs = parse_pairs(cfg.hidden_layers, student.config.num_hidden_layers, teacher.config.num_hidden_layers,
                            kept.get("layers"))
        projections = [projection(student.config.hidden_size, teacher.config.hidden_size, kept.get("hidden")).to(device)
                       for _ in pairs]
        log.info("hidden-state loss on (student, teacher) layers %s, weight %s", pairs, cfg.hidden_weight)
    if cfg.activation_checkpointing:
        checkpoint_activations(student)
    trunk = Trunk(student, [s for s, _ in pairs], projections)
    tied = tied_groups(trunk)
    if strategy != "fsdp" and world > 1 and (cfg.shard_teacher or cfg.sharded_checkpoints):
        raise TailleError("--shard-teacher and --sharded-checkpoints need FSDP, and this run is DDP: add --strategy fsdp "
                          "(or launch with an FSDP accelerate config)")
    if strategy == "fsdp":  # before the optimizer: it must hold the sharded parameters
        shard(trunk, teacher, _layers, cfg.shard_teacher, precision)
    # the student's head is read inside the trunk's forward (whole there under FSDP): no reference kept here,
    # which would also keep the unsharded original alive on every process
    heads = (None, None, *(_head(teacher) if teacher is not None else (None, None)))
    decay = [p for n, p in trunk.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in trunk.named_parameters() if p.dim() < 2]
    raw_optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    order = parameter_order(trunk, raw_optimizer)
    optimizer = raw_optimizer
    if strategy == "ddp":  # one process needs no wrapper (and accelerate's own FSDP must not take over)
        trunk, optimizer = accelerator.prepare(trunk, raw_optimizer)
    start_step, state = 0, {"tokens": 0, "seconds": 0.0, "loss": None}
    if resume_from is not None:
        restore(resume_from, trunk if strategy == "fsdp" else accelerator.unwrap_model(trunk), raw_optimizer,
                strategy, tied, order, accelerator.process_index, world)
        saved = json.loads((resume_from / "state.json").read_text())
        start_step, state = saved["step"], {k: saved.get(k) for k in ("tokens", "seconds", "loss")}
        log.info("resuming from %s (step %d of %d)", resume_from, start_step, total_steps)
    return Run(cfg=cfg, accelerator=accelerator, device=device, precision=precision, student=student,
               tokenizer=tokenizer, teacher=teacher, trunk=trunk, optimizer=optimizer, blocks=blocks, cache=cache,
               eval_blocks=eval_blocks, source=source, pairs=pairs, global_batch=global_batch,
               total_steps=total_steps, start_step=start_step, state=state, resume_from=resume_from,
               heads=heads, strategy=strategy, raw_optimizer=raw_optimizer, tied=tied, order=order,
               reply_marker=marker, replies=replies)


def _layers(model):
    from taille.models.arch import get_arch

    return model.get_submodule(get_arch(model.config).layers)


def _same_on_every_process(accelerator, value: str, what: str) -> None:
    """Refuse, on every process at once, what some process sees differently (a cache one node cannot read)."""
    from accelerate.utils import gather_object

    seen = gather_object([value]) if accelerator.num_processes > 1 else [value]
    for rank, other in enumerate(seen):
        if other.startswith("error: "):
            raise TailleError(f"{what}: process {rank} cannot read it ({other[7:]}); every process needs the "
                              "same cache at the same path (a shared filesystem, or a copy on each node)")
    if len(set(seen)) > 1:
        raise TailleError(f"{what}: the processes read different caches at this path; every process needs the "
                          "same one (a shared filesystem, or the same copy on each node)")


def train_step(run: Run, step: int) -> dict:
    """One optimizer step (grad_accum micro-steps); returns loss, hidden loss and gradient norm as 0-d
    tensors: reading them is the caller's one sync point."""
    from taille.data.mixture import run_order
    from taille.data.tokens import as_ids
    from taille.models.precision import autocast

    cfg, accelerator, device, trunk = run.cfg, run.accelerator, run.device, run.trunk
    rank, world = accelerator.process_index, accelerator.num_processes
    lr = lr_at(step, run.total_steps, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    order = run_order(run.blocks, cfg.seed, step * run.global_batch, run.global_batch)
    n_targets, replies = run.n_targets, None
    if run.replies is not None:  # the global batch's reply targets, counted alike on every process
        replies = run.replies(order)[:, 1:]  # (global batch, T - 1)
        n_targets = int(replies.sum())
        if not n_targets:  # nothing to learn from: no update (AdamW would still decay and coast), on every process
            log.warning("step %d: no reply token in its %d blocks (--loss-on replies): skipped", step, len(order))
            zero = torch.zeros((), device=device)
            return {"loss": zero, "hidden_loss": zero, "grad_norm": zero, "lr": lr}
    step_loss = torch.zeros((), device=device)
    step_hidden = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        first = (micro * world + rank) * cfg.batch_size
        places = first + np.argsort(order[first:first + cfg.batch_size], kind="stable")  # global places, by block
        rows = order[places]
        ids = as_ids(run.blocks[rows], device)  # (B, T)
        top = run.cache.batch(rows, device) if run.cache is not None else None
        if cfg.on_policy:
            ids = _student_tails(run, step, ids, places)
        last = micro == cfg.grad_accum - 1
        # FSDP reduce-scatters every micro-step: gradients held unreduced would be whole on every process
        sync = contextlib.nullcontext() if last or run.strategy == "fsdp" else accelerator.no_sync(trunk)
        # record_function names the phases in a torch.profiler trace (benchmarks/distill_throughput.py)
        with sync, autocast(run.precision, device.type):
            teacher = _teacher_outputs(run, ids, top)
            weights = None if replies is None else torch.from_numpy(replies[places]).to(device)
            loss_sum, hidden_sum = trunk(ids, teacher=teacher, loss_cfg=cfg.loss, weights=weights)
            if run.pairs:
                loss_sum = loss_sum + cfg.hidden_weight * hidden_sum
                step_hidden += hidden_sum.detach() / n_targets
            # DDP and FSDP average gradients over processes: scale so the result is the global token mean.
            loss = loss_sum * world / n_targets
            with record_function("taille.backward"):
                loss.backward()
        step_loss += loss_sum.detach() / n_targets
    with record_function("taille.optimizer"):
        # clipping computes the total norm anyway; without clipping (clip 0) an infinite max_norm measures it
        grad_norm = clip_gradients(list(trunk.parameters()), cfg.clip or float("inf"))
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    step_loss = accelerator.reduce(step_loss, reduction="sum")
    if run.pairs:
        step_hidden = accelerator.reduce(step_hidden, reduction="sum")
    return {"loss": step_loss, "hidden_loss": step_hidden, "grad_norm": grad_norm, "lr": lr}


def _student_tails(run: Run, step: int, ids: torch.Tensor, places: np.ndarray) -> torch.Tensor:
    """`ids` (B, T) with the last on_policy_tokens of its on-policy blocks (from a reply's start within them,
    with --on-policy-from reply) sampled by the student from the rest (taille/distill/onpolicy.py). Every process has the same number of them (a whole share of its
    batch): the student's forward passes here are collective under FSDP."""
    from taille.distill.onpolicy import on_policy_places, place_generators, tail_starts
    from taille.models.precision import autocast

    cfg = run.cfg
    chosen = on_policy_places(run.global_batch, cfg.on_policy, cfg.batch_size)[places]  # (B,) bool, never all False
    prompt = ids.shape[1] - cfg.on_policy_tokens
    sampled = torch.from_numpy(np.flatnonzero(chosen)).to(ids.device)  # (n,)
    forced = None
    if run.reply_marker:  # the data's tokens stand until each block's reply begins
        starts = tail_starts(ids[sampled], cfg.on_policy_tokens, run.reply_marker)  # (n,)
        forced = ids[sampled, prompt:].clone()  # (n, on_policy_tokens)
        forced[torch.arange(prompt, ids.shape[1], device=ids.device)[None] >= starts[:, None]] = -1
    # no_grad outside the wrapper too: DDP would otherwise wait for this forward's gradients
    with torch.no_grad(), record_function("taille.on_policy_sample"), autocast(run.precision, run.device.type):
        tails = run.trunk(ids[sampled, :prompt], sample=cfg.on_policy_tokens,
                          generators=place_generators(cfg.seed, step, places[chosen]), forced=forced)
    ids = ids.clone()
    ids[sampled, prompt:] = tails
    return ids


def save(run: Run, step: int) -> Path | None:
    """A checkpoint at `step` (rank 0 writes; every rank waits for it)."""
    state = {**run.state, "processes": run.accelerator.num_processes, "global_batch": run.global_batch}
    if run.strategy == "fsdp":
        return save_fsdp(Path(run.cfg.out), step, run.trunk, run.raw_optimizer, run.cfg, state, run.tied, run.order,
                         run.accelerator.process_index, run.accelerator.num_processes, run.cfg.sharded_checkpoints)
    last = None
    if run.accelerator.is_main_process:
        last = save_checkpoint(Path(run.cfg.out), step, run.student, run.raw_optimizer, run.cfg, state,
                               projections=run.accelerator.unwrap_model(run.trunk).projections)
    run.accelerator.wait_for_everyone()
    return last


def distill(cfg: DistillConfig) -> dict:
    """Run (or resume) a distillation; returns the final record (also written to OUT/taille.json)."""
    from tqdm.auto import tqdm

    from taille.data.mixture import run_order, trained_on

    run = setup(cfg)
    accelerator, out = run.accelerator, Path(cfg.out)
    trackers = cfg.report_to != "none"
    metrics_path = out / "metrics.jsonl"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if run.start_step == 0:
            metrics_path.write_text("")
            (out / "distill.yaml").write_text(_yaml(cfg.to_dict()))
        elif metrics_path.is_file():  # drop what was logged after the checkpoint: those steps run again
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= run.start_step]
            _atomic_write(metrics_path, "".join(line + "\n" for line in kept))
    if trackers:
        accelerator.init_trackers("taille-distill", config=_flat(cfg.to_dict()))

    def log_metrics(record: dict) -> None:
        if accelerator.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if trackers:
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    state, total_steps = run.state, run.total_steps
    tokens_per_step = run.global_batch * cfg.seq_len
    bar = tqdm(total=total_steps, initial=run.start_step, desc="distill", unit="step",
               disable=not (cfg.progress and accelerator.is_main_process))
    last_good = run.resume_from
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    for step in range(run.start_step, total_steps):
        result = train_step(run, step)
        loss_value = float(result["loss"])  # one sync per optimizer step: also the NaN check
        if not math.isfinite(loss_value):
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
            raise TailleError(f"the loss became {loss_value} at step {step + 1}; stopping ({where}); "
                              "try a lower --lr or --precision fp32")
        state["tokens"] += tokens_per_step
        state["loss"] = loss_value
        window_loss += loss_value
        window_steps += 1
        window_tokens += tokens_per_step
        done = step + 1
        if done % cfg.log_every == 0 or done == total_steps:
            elapsed = time.perf_counter() - window_start
            grad_norm = float(result["grad_norm"])
            record = {"step": done, "tokens": state["tokens"], "loss": loss_value,
                      "loss_avg": window_loss / window_steps, "lr": result["lr"], "grad_norm": grad_norm,
                      "tokens_per_s": window_tokens / elapsed}
            if run.pairs:  # the hidden-state part of `loss` (1 - cosine per token and pair, weighted)
                record["hidden_loss"] = cfg.hidden_weight * float(result["hidden_loss"])
            state["seconds"] += elapsed
            log_metrics(record)
            bar.set_postfix(loss=f"{loss_value:.4f}", grad_norm=f"{grad_norm:.3g}", tok_s=f"{record['tokens_per_s']:.0f}")
            window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        bar.update(1)
        if run.eval_blocks is not None and (done % cfg.eval_every == 0 or done == total_steps):
            eval_start = time.perf_counter()
            metrics = evaluate_student(run)
            log_metrics({"step": done, "tokens": state["tokens"], **metrics})
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            window_start += time.perf_counter() - eval_start  # tokens/s counts training time only
        if done % cfg.save_every == 0 or done == total_steps:  # the last one lets --resume of a finished run no-op
            save_start = time.perf_counter()
            last_good = save(run, done) or last_good
            window_start += time.perf_counter() - save_start
    bar.close()

    blocks = run.blocks
    record = {"config": cfg.to_dict(), "steps": total_steps, "tokens": state["tokens"],
              "data": trained_on(blocks, run_order(blocks, cfg.seed, 0, total_steps * run.global_batch), run.source),
              "global_batch": run.global_batch, "processes": accelerator.num_processes, "strategy": run.strategy,
              "precision": run.precision, "final_loss": state["loss"], "seconds": round(state["seconds"], 1)}
    weights = _gathered_student(run) if run.strategy == "fsdp" else None
    if accelerator.is_main_process:
        _save_student(run.student, run.tokenizer, out, cfg, record, weights)
        from taille.distill.figures import plot_curves

        plot_curves(metrics_path, out / "curves.png")
    if trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return record


def _gathered_student(run: Run) -> dict:
    """The sharded student's whole weights on rank 0 (in CPU memory; {} elsewhere): every process calls."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(run.trunk, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[3:]: v for k, v in full.items() if k.startswith("lm.")}


def _save_student(student, tokenizer, out: Path, cfg: DistillConfig, record: dict, weights: dict | None = None) -> None:
    """An ordinary Hugging Face folder; `weights` replace the module's own (a sharded student's, gathered)."""
    source = Path(cfg.student) / "taille.json"
    history = json.loads(source.read_text()) if source.is_file() else None
    student.config.name_or_path = str(out)
    if weights is not None:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            whole = AutoModelForCausalLM.from_config(student.config, dtype=next(iter(weights.values())).dtype)
        whole.load_state_dict(weights, assign=True)
        whole.tie_weights()
        whole.generation_config = student.generation_config
        student = whole
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "taille.json").write_text(json.dumps({"distill": record, "pruned_from": history}, indent=1))


def _flat(values: dict, prefix: str = "") -> dict:
    """Nested config -> {"loss.kind": "fkl", ...} with scalar values, as trackers want hyper-parameters."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _yaml(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)
