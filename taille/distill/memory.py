"""`taille plan --distill`: what one GPU holds while `taille distill` runs, from two configs (no weights).

Bytes are counted the way the loop in train.py and transformers' Llama-style decoder allocate them
(checked tensor by tensor against autograd's saved tensors in tests/distill/test_memory.py, and against
the measured peak of a real run in benchmarks/distill_memory.py):

  student      fp32 master weights, fp32 gradients, AdamW's two fp32 moments; under bf16-mixed, autocast
               keeps a bf16 copy of every matmul weight for the micro-step (DDP), while FSDP gathers the
               weights in bf16 itself (its mixed-precision policy) and frees each layer's after use;
  teacher      frozen, bf16 on a GPU (fp32 under fp32), fp32 on a CPU; no activations kept (no_grad), only its final hidden
               states (B, T-1, H_t) until the loss;
  activations  per decoder layer, what autograd saves for backward: the residual stream and the RMSNorm
               internals in fp32, one bf16 copy of a norm's output per projection that reads it, rotated
               q and k, v, the attention output and its log-sum-exp (SDPA's flash kernels), and the four
               MLP tensors; with activation checkpointing, each layer's input only and one layer again in
               backward;
  logit slices the loss applies the heads `LOGIT_ELEMENTS // vocab` positions at a time (losses.py): per
               slice the student's logits, 2 fp32 tensors of the same size (3 more and the teacher's fp32
               logits with a live teacher) and the previous slice's gradient;
  loss buffers the LM head's fp32 gradient and the hidden states' gradient, worked out in the forward.

The peak is the largest of three moments: the loss (every activation alive, plus the slices), the
start of backward (the head's gradient copied out, one layer's backward), and the optimizer step
(gradients, AdamW's temporaries). Strategies, as taille/distill/sharding.py sets them up: DDP (everything
replicated, the reducer's gradient buckets beside the gradients; on one GPU, plain training without them),
FSDP (fully_shard per decoder layer, the rest the root: the student's weights, gradients and AdamW state
divided by N; the layer being computed and the next one gathered, the root's embeddings and head gathered
from forward to backward), FSDP with the teacher's decoder layers sharded too (--shard-teacher), and DDP or
FSDP from a teacher cache (no teacher in memory; its top-K log-probabilities and ids per position instead).
With --grad-accum > 1 the gradients stay between micro-steps; FSDP reduce-scatters them every micro-step,
so they stay divided by N.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

from taille.errors import TailleError
from taille.options import Bytes, coerce

GiB = 2**30
SETUPS = {"ddp": "DDP", "ddp-cache": "DDP + teacher cache", "fsdp": "FSDP", "fsdp-teacher": "FSDP, teacher sharded",
          "fsdp-cache": "FSDP + teacher cache"}
"""Columns of the plan, simplest first (a tie on the GPU count goes to the first)."""
DEVICES = ("cuda", "cpu")
MAX_GPUS = 1024
"""The fewest GPUs that fit is searched up to this count."""
SHAPE_KEYS = ("hidden", "ffn", "heads", "kv_heads", "layers")


@dataclass
class DistillMemorySettings:
    """The distillation `taille plan --distill` sizes: the student, the batch, the GPUs."""

    student: str | None = None
    """The student: a model or config folder (a `taille prune` output), or a shape cut from MODEL such as
    hidden=3072,ffn=9216 or layers=16 (axes not named keep the teacher's)."""
    recipe: str | None = None
    """Take the student shape, --batch-size, --seq-len, --grad-accum and --activation-checkpointing from a recipe
    (a YAML file or a shipped recipe's name); flags given as well win."""
    gpus: int = 8
    """GPUs the table is for (the fewest that fit are searched as well)."""
    gpu_memory: Bytes = "80G"
    """Memory of one GPU: 80G, 24G, 141G (G = 2^30 bytes)."""
    batch_size: int | None = None
    """Blocks per GPU per micro-step (default: the recipe's, else `taille distill`'s)."""
    seq_len: int | None = None
    """Tokens per block (default: the recipe's, else `taille distill`'s)."""
    grad_accum: int | None = None
    """Micro-steps per optimizer step (default: the recipe's, else 1)."""
    precision: str = "auto"
    """auto (bf16-mixed on a GPU, and on a CPU with AMX/AVX512-BF16), bf16-mixed or fp32: as `taille distill`."""
    device: str = "cuda"
    """cuda (teacher in bf16 unless fp32, 512 MiB logit slices) or cpu (teacher in fp32, 64 MiB slices), as the loop picks."""
    top_k: int = 128
    """Log-probabilities per position in the teacher cache (the teacher-cache columns)."""
    activation_checkpointing: bool = False
    """Plan `taille distill --activation-checkpointing`: each decoder layer recomputed in backward (its input kept)."""

    def __post_init__(self):
        coerce(self)
        from taille.models.precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise TailleError(f"--precision {self.precision}: use one of {', '.join(PRECISIONS)}")
        if self.device not in DEVICES:
            raise TailleError(f"--device {self.device}: use one of {', '.join(DEVICES)}")
        if self.gpus < 1 or self.gpus > MAX_GPUS:
            raise TailleError(f"--gpus {self.gpus}: between 1 and {MAX_GPUS}")
        if self.gpu_memory < 1:
            raise TailleError(f"--gpu-memory {self.gpu_memory}: must be positive, e.g. 80G")
        for name in ("batch_size", "grad_accum", "top_k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TailleError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.seq_len is not None and self.seq_len < 2:
            raise TailleError(f"--seq-len {self.seq_len}: must be at least 2 (a block predicts its next tokens)")


@dataclass(frozen=True)
class Dims:
    """What the plan needs of one model: its widths and parameter counts."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    params: int
    layer_params: int
    """One decoder layer."""
    linear_params: int
    """Matmul weights of every layer (q, k, v, o, gate, up, down): what autocast copies to bf16."""
    root_params: int
    """Embeddings, final norm and an untied head: the root FSDP group, gathered from forward to backward."""
    qk_norm: bool = False
    post_norms: int = 0
    """Norms on a sub-block's output before the residual add (Gemma's sandwich norms)."""

    @classmethod
    def of(cls, config, shape=None) -> "Dims":
        from taille.models.arch import get_arch, head_dim
        from taille.prune.shape import Shape, count_params, shape_of

        s = shape or shape_of(config)
        layers0 = count_params(config, Shape(s.hidden, s.ffn, s.heads, s.kv_heads, 0))
        d = head_dim(config)
        return cls(hidden=s.hidden, ffn=s.ffn, heads=s.heads, kv_heads=s.kv_heads, head_dim=d, layers=s.layers,
                   vocab=config.vocab_size, params=count_params(config, s),
                   layer_params=count_params(config, Shape(s.hidden, s.ffn, s.heads, s.kv_heads, 1)) - layers0,
                   linear_params=s.layers * (2 * s.hidden * (s.heads + s.kv_heads) * d + 3 * s.hidden * s.ffn),
                   root_params=layers0, qk_norm=get_arch(config).qk_norm, post_norms=len(get_arch(config).post_norms))


def layer_activation_bytes(m: Dims, compute: int, residual: int = 4) -> int:
    """Bytes per token that one decoder layer saves for backward, at `compute` bytes per matmul operand
    (2 under bf16 autocast, 4 in fp32) with an fp32 residual stream (the student's fp32 weights)."""
    H, F = m.hidden, m.ffn
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim

    def norm_output(readers: int) -> int:  # autocast casts it once per projection; in fp32 it is shared
        return readers * compute * H if compute < residual else residual * H

    stream = 2 * residual * H  # the layer's input and the stream after attention (the norms' inputs)
    norms = 2 * (residual * H + 4)  # each RMSNorm's normalised input and 1/rms per token
    attention = compute * (2 * q + 2 * kv) + 4 * m.heads  # rotated q and k, v, output; fp32 log-sum-exp
    if m.qk_norm:  # per-head norms on q and k: an fp32 copy of each projection, its normalised cast, 1/rms
        attention += (4 + compute) * (q + kv) + 4 * (m.heads + m.kv_heads)
    mlp = 4 * compute * F  # gate, act(gate), up, act(gate) * up
    sandwich = m.post_norms * (8 * H + 4)  # Gemma: each post-norm's fp32 input and normalised input (approximate)
    return stream + norms + norm_output(3) + norm_output(2) + attention + mlp + sandwich


def activation_bytes(m: Dims, batch: int, seq: int, compute: int, checkpointing: bool = False) -> dict:
    """What the student's forward leaves for backward (B x T tokens): {"kept": bytes alive at the loss,
    "recompute": one layer rebuilt in backward under activation checkpointing (else 0)}."""
    n = batch * seq
    per_layer = layer_activation_bytes(m, compute) * n
    stem = 8 * n + 2 * 4 * seq * m.head_dim  # token ids (the embedding's backward) and RoPE's cos, sin
    final = (3 * 4 * m.hidden + 4) * n  # the final norm's input and normalised input, and its output
    if checkpointing:
        return {"kept": stem + final + m.layers * 4 * m.hidden * n, "recompute": per_layer}
    return {"kept": stem + final + m.layers * per_layer, "recompute": 0}


def slice_rows(vocab: int, rows: int, device: str) -> int:
    """Positions per logit slice: the loss's own rule (LOGIT_ELEMENTS of the device / vocabulary)."""
    from taille.distill.losses import LOGIT_ELEMENTS

    return min(rows, max(1, LOGIT_ELEMENTS[device] // vocab))


def slice_bytes(student: Dims, teacher_vocab: int | None, rows: int, compute: int, device: str) -> int:
    """The logit slice at its fullest (forward KL with its written-out gradient, losses.py): per position the
    student's logits at `compute` bytes, their fp32 log-softmax and probabilities, and with a live teacher
    its fp32 logits (over its own vocabulary), log-softmax, probabilities and their product; from the
    second slice on, the previous slice's gradient (`compute` bytes) is still referenced beside them."""
    n, V = slice_rows(student.vocab, rows, device), student.vocab
    per_row = (compute + 8) * V if teacher_vocab is None else (compute + 20) * V + 4 * teacher_vocab
    slices = -(-rows // n)
    if slices == 1:
        return rows * per_row
    second = min(n, rows - n)  # only the last slice is short
    return max(n * per_row, second * per_row + n * compute * V)


@dataclass
class Column:
    """One strategy on N GPUs: bytes per GPU of each part at the step's peak moment."""

    strategy: str
    gpus: int
    parts: dict[str, int]
    """Part -> bytes at the peak moment (parts not alive then are 0)."""
    moment: str
    """loss, backward or optimizer: where the step peaks."""
    peak: int
    moments: dict[str, int]
    """Peak bytes of each moment."""

    def to_dict(self) -> dict:
        return asdict(self)


PARTS = ("student weights", "gradients", "AdamW state", "DDP gradient buckets", "bf16 weight copies",
         "FSDP gathered weights", "teacher weights", "activations", "teacher inputs", "loss buffers",
         "logit slices", "backward / optimizer temporaries")


def per_gpu(student: Dims, teacher: Dims, cfg: DistillMemorySettings, strategy: str, gpus: int) -> Column:
    """Bytes one GPU holds for `strategy` on `gpus` GPUs at each moment of the step; the largest is the peak."""
    compute = 2 if resolved_precision(cfg) == "bf16-mixed" else 4
    B, T = cfg.batch_size, cfg.seq_len
    rows = B * (T - 1)  # positions that predict a next token
    sharded = strategy.startswith("fsdp")
    shards = gpus if sharded else 1
    cache = strategy.endswith("cache")
    # the loop loads the teacher in bf16 on a GPU (fp32 under --precision fp32), fp32 on a CPU
    t_bytes = 2 if cfg.device == "cuda" and compute == 2 else 4
    Ps = student.params

    weights = 4 * Ps / shards
    adam = 8 * Ps / shards
    buckets = 4 * Ps if not sharded and gpus > 1 else 0
    # accumulated between micro-steps; FSDP reduce-scatters every micro-step, so they stay sharded
    held_grads = 4 * Ps / shards if cfg.grad_accum > 1 else 0
    # autocast's bf16 copies of the matmul weights, kept for backward; under FSDP the gathered weights are
    # bf16 themselves (its mixed-precision policy) and freed after each layer's forward
    copies = 2 * student.linear_params if compute == 2 and not sharded else 0
    gathered = compute * (2 * student.layer_params + student.root_params) if sharded else 0
    if cache:
        teacher_weights = 0
    elif strategy == "fsdp-teacher":  # its decoder layers sharded (two gathered at a time), the rest whole
        teacher_weights = t_bytes * ((teacher.params - teacher.root_params) / gpus + 2 * teacher.layer_params
                                     + teacher.root_params)
    else:
        teacher_weights = t_bytes * teacher.params
    # the teacher's part of the batch: top-K fp32 log-probs, int64 ids and the outside mass; or its hidden states
    teacher_inputs = rows * (12 * cfg.top_k + 4) if cache else rows * teacher.hidden * t_bytes
    acts = activation_bytes(student, B, T, compute, cfg.activation_checkpointing)
    final = 4 * B * T * student.hidden  # the final hidden states: freed when the trunk's forward returns
    head = 4 * student.vocab * student.hidden  # the head's fp32 gradient, built in the loss's forward
    hidden_grad = 4 * rows * student.hidden  # the gradient of the (B*(T-1), H) hidden states, idem
    hidden_copy = hidden_grad if B > 1 else 0  # the hidden states the loss reads (a view when B = 1)
    slices = slice_bytes(student, None if cache else teacher.vocab, rows, compute, cfg.device)
    # one layer's backward: its weights' fp32 gradients (unsharded, before reduce-scatter) and the gradients
    # of its MLP activations
    layer_backward = 4 * student.layer_params + B * T * (3 * compute * student.ffn + 2 * 4 * student.hidden)
    # AdamW's square root of the second moment: all at once on a GPU (foreach), one tensor at a time on a CPU
    optimizer_temp = 4 * Ps / shards if cfg.device == "cuda" else 8 * student.hidden * max(student.vocab, student.ffn)

    base = {"student weights": weights, "AdamW state": adam, "DDP gradient buckets": buckets,
            "teacher weights": teacher_weights}
    step = {**base, "gradients": held_grads, "bf16 weight copies": copies, "FSDP gathered weights": gathered,
            "activations": acts["kept"], "teacher inputs": teacher_inputs}
    moments = {
        "loss": {**step, "loss buffers": head + hidden_grad + hidden_copy, "logit slices": slices},
        # backward starts by copying out the head's and the hidden states' gradients, then one layer at a time
        "backward": {**step, "activations": acts["kept"] - final + acts["recompute"],
                     "loss buffers": 2 * (head + hidden_grad), "backward / optimizer temporaries": layer_backward},
        # the last micro-step's teacher inputs are still referenced during the update
        "optimizer": {**base, "gradients": 4 * Ps / shards, "teacher inputs": teacher_inputs,
                      "backward / optimizer temporaries": optimizer_temp},
    }
    totals = {name: int(sum(parts.values())) for name, parts in moments.items()}
    moment = max(totals, key=totals.get)
    parts = {p: int(moments[moment].get(p, 0)) for p in PARTS}
    return Column(strategy, gpus, parts, moment, totals[moment], totals)


def resolved_precision(cfg: DistillMemorySettings) -> str:
    """'auto' as the loop resolves it: bf16-mixed on a GPU (bf16 since Ampere), on a CPU where it is fast."""
    if cfg.precision != "auto":
        return cfg.precision
    if cfg.device == "cuda":
        return "bf16-mixed"
    from taille.models.precision import cpu_has_fast_bf16

    return "bf16-mixed" if cpu_has_fast_bf16() else "fp32"


def fewest_gpus(student: Dims, teacher: Dims, cfg: DistillMemorySettings, strategy: str) -> Column | None:
    """The fewest GPUs (up to MAX_GPUS) on which `strategy` fits cfg.gpu_memory, as its column; None if none.
    Under FSDP the share per GPU only shrinks as GPUs are added, so the count is found by bisection."""
    if not strategy.startswith("fsdp"):  # DDP's share does not shrink: one GPU (no buckets), or none
        column = per_gpu(student, teacher, cfg, strategy, 1)
        return column if column.peak <= cfg.gpu_memory else None
    if per_gpu(student, teacher, cfg, strategy, MAX_GPUS).peak > cfg.gpu_memory:
        return None
    lo, hi = 1, MAX_GPUS  # the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if per_gpu(student, teacher, cfg, strategy, mid).peak <= cfg.gpu_memory else (mid + 1, hi)
    return per_gpu(student, teacher, cfg, strategy, lo)


@dataclass
class MemoryPlan:
    settings: dict
    teacher: dict
    student: dict
    columns: list[Column]
    """Each strategy on --gpus GPUs."""
    fewest: dict[str, Column | None]
    """Each strategy on the fewest GPUs that fit (None: no count up to MAX_GPUS)."""
    smallest: Column | None
    """The setup with the fewest GPUs (the simplest strategy on a tie)."""
    advice: str | None
    """When nothing fits: one line saying so and what would."""

    def to_dict(self) -> dict:
        return {"settings": self.settings, "teacher": self.teacher, "student": self.student,
                "columns": [c.to_dict() for c in self.columns],
                "fewest_gpus": {k: (c.to_dict() if c else None) for k, c in self.fewest.items()},
                "smallest": self.smallest.to_dict() if self.smallest else None, "advice": self.advice}


def plan_memory(teacher: Dims, student: Dims, cfg: DistillMemorySettings) -> MemoryPlan:
    """Per-GPU bytes of every strategy on cfg.gpus GPUs, the fewest GPUs each needs, and what would fit
    when nothing does."""
    if cfg.batch_size is None or cfg.seq_len is None or cfg.grad_accum is None:
        raise TailleError("the memory plan needs --batch-size, --seq-len and --grad-accum (or a --recipe)")
    columns = [per_gpu(student, teacher, cfg, s, cfg.gpus) for s in SETUPS]
    fewest = {s: fewest_gpus(student, teacher, cfg, s) for s in SETUPS}
    fitting = [c for c in fewest.values() if c is not None]
    smallest = min(fitting, key=lambda c: c.gpus) if fitting else None  # min keeps the first: the simplest
    settings = {**asdict(cfg), "precision": resolved_precision(cfg)}
    return MemoryPlan(settings, asdict(teacher), asdict(student), columns, fewest, smallest,
                      None if fitting else advice(teacher, student, cfg))


def _best(teacher: Dims, student: Dims, cfg: DistillMemorySettings) -> Column | None:
    fitting = [c for c in (fewest_gpus(student, teacher, cfg, s) for s in SETUPS) if c is not None]
    return min(fitting, key=lambda c: c.gpus) if fitting else None


def advice(teacher: Dims, student: Dims, cfg: DistillMemorySettings) -> str:
    """One line: nothing fits cfg.gpu_memory on any GPU count, the least any strategy needs and the parts of it
    that no GPU count divides, and what would fit: activation checkpointing, no gradient accumulation (its
    gradients stay between micro-steps), the largest smaller batch, a shorter sequence (down to a quarter); the
    teacher cache is a column of its own."""
    from dataclasses import replace

    floor = min((per_gpu(student, teacher, cfg, s, MAX_GPUS) for s in SETUPS), key=lambda c: c.peak)
    fixed = sorted(((v, p) for p, v in floor.parts.items() if p not in ("student weights", "AdamW state")), reverse=True)
    line = (f"nothing fits {_gib(cfg.gpu_memory)} per GPU on up to {MAX_GPUS} GPUs: {SETUPS[floor.strategy]} still "
            f"needs {_gib(floor.peak)} per GPU there, what sharding does not divide: "
            + ", ".join(f"{p} {_gib(v)}" for v, p in fixed[:3])
            + f" (batch {cfg.batch_size} x {cfg.seq_len}{', grad-accum ' + str(cfg.grad_accum) if cfg.grad_accum > 1 else ''})")
    words = {"activation_checkpointing": "activation checkpointing", "grad_accum": "--grad-accum 1"}
    extras = [("", {})]
    for change in ({"activation_checkpointing": True}, {"grad_accum": 1}, {"activation_checkpointing": True, "grad_accum": 1}):
        change = {k: v for k, v in change.items() if getattr(cfg, k) != v}  # what the run does not do already
        if change and change not in [c for _, c in extras]:
            extras.append((" and ".join(words[k] for k in change), change))
    candidates = extras[1:]
    for batch in range(cfg.batch_size - 1, 0, -1):  # then the largest batch that fits (with the fewest extras)
        candidates += [(f"--batch-size {batch}" + (f" with {label}" if label else ""), {**change, "batch_size": batch})
                       for label, change in extras]
    seq = cfg.seq_len // 2
    while seq >= max(2, cfg.seq_len // 4):  # then shorter blocks, down to a quarter (shorter is another training)
        candidates += [(f"--batch-size 1 --seq-len {seq}" + (f" with {label}" if label else ""),
                        {**change, "batch_size": 1, "seq_len": seq}) for label, change in extras]
        seq //= 2
    options = []
    for label, change in candidates:
        found = _best(teacher, student, replace(cfg, **change))
        if found is not None:
            options.append(f"{label} ({SETUPS[found.strategy]} on {found.gpus} GPU{'s' * (found.gpus > 1)}, "
                           f"{_gib(found.peak)} each)")
            if len(options) == 3 or "batch_size" in change:  # past the extras, the first that fits is the answer
                break
    what = "; ".join(options) if options else (
        f"GPUs with more memory (no smaller batch, activation checkpointing or sequence down to "
        f"{max(2, cfg.seq_len // 4)} tokens fits)")
    return f"{line}. What would: {what}."


def _gib(n: float) -> str:
    return f"{n / GiB:,.1f} GiB"


# --- from what the user gave: configs, a student spec, a recipe -------------------------------------


def parse_student_shape(spec: str, teacher_config):
    """'hidden=3072,ffn=9216' -> the teacher's shape with those axes changed (checked like `prune`'s)."""
    from dataclasses import replace

    from taille.prune.shape import check_shape, shape_of

    values = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in SHAPE_KEYS or not value.strip().isdigit():
            raise TailleError(f"--student {spec}: write a shape as KEY=N pairs with keys {', '.join(SHAPE_KEYS)} "
                              "(e.g. hidden=3072,ffn=9216), or give a model folder")
        values[key] = int(value)
    shape = replace(shape_of(teacher_config), **values)
    check_shape(teacher_config, shape)
    return shape


def resolve(model: str, cfg: DistillMemorySettings) -> tuple[Dims, Dims, DistillMemorySettings]:
    """(teacher, student, settings with the recipe's and `taille distill`'s defaults filled in)."""
    from dataclasses import replace

    from taille.distill.config import DistillConfig
    from taille.models.load import load_config

    teacher_config = load_config(model)
    shape, student_config, fill = None, None, {}
    if cfg.recipe:
        from taille.run.recipe import distill_config, load_recipe, plan_recipe

        recipe = load_recipe(cfg.recipe)
        planned = plan_recipe(recipe, teacher_config) if recipe.prune and not recipe.search else None
        if planned is None and not cfg.student:
            raise TailleError(f"--recipe {cfg.recipe} picks its student by search: give --student")
        if planned is not None and not cfg.student:
            from taille.prune.shape import Shape

            shape = Shape(**planned["prune"]["shape"])
        run = distill_config(recipe, "STUDENT", "OUT")
        fill = {"batch_size": run.batch_size, "seq_len": run.seq_len, "grad_accum": run.grad_accum}
        if run.activation_checkpointing:
            fill["activation_checkpointing"] = True
    if cfg.student and "=" in cfg.student:
        shape = parse_student_shape(cfg.student, teacher_config)
    elif cfg.student:
        student_config = load_config(cfg.student)
    elif shape is None:
        raise TailleError("--distill needs the student: --student FOLDER, --student hidden=3072,ffn=9216, or --recipe")
    defaults = {f: DistillConfig.__dataclass_fields__[f].default for f in ("batch_size", "seq_len", "grad_accum")}
    filled = {k: getattr(cfg, k) if getattr(cfg, k) is not None else fill.get(k, defaults[k]) for k in defaults}
    filled["activation_checkpointing"] = cfg.activation_checkpointing or fill.get("activation_checkpointing", False)
    teacher = Dims.of(teacher_config)
    student = Dims.of(student_config) if student_config is not None else Dims.of(teacher_config, shape)
    if student.vocab > teacher.vocab:
        raise TailleError(f"the student's vocabulary ({student.vocab}) is larger than the teacher's ({teacher.vocab}): "
                          "distillation needs a shared tokenizer")
    return teacher, student, replace(cfg, **filled)


# --- measuring ----------------------------------------------------------------------------------------


def live_bytes():
    """A TorchDispatchMode counting the bytes of tensor storage alive (`now`) and their maximum (`peak`) while
    active: every storage an op reads or returns counts from its first sight until it is freed (a weak
    reference's callback); `register(tensor)` adds one made earlier (weights, optimizer state). What the plan
    counts, and what torch.cuda.max_memory_allocated reports on a GPU; storages resized in place (FSDP's)
    are not followed."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map_only
    from torch.utils.weak import WeakIdKeyDictionary

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs = WeakIdKeyDictionary()  # storage -> the weak reference whose callback subtracts its bytes
            self.now = self.peak = 0

        def register(self, tensor) -> None:
            storage = tensor.untyped_storage()
            if storage in self.refs:
                return
            size = storage.nbytes()

            def released(_, size=size):
                self.now -= size

            self.refs[storage] = weakref.ref(storage, released)
            self.now += size
            self.peak = max(self.peak, self.now)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tree_map_only(torch.Tensor, self.register, (args, kwargs))  # inputs made outside torch ops (numpy)
            out = func(*args, **(kwargs or {}))
            tree_map_only(torch.Tensor, self.register, out)
            return out

    return LiveBytes()
