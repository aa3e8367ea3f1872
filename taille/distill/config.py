"""Settings of `taille distill`, `taille correct` and `taille teacher-cache`: each field is a flag, a recipe
key and an argument of the Python API at once (see taille/options.py). Every combination the training
loop cannot run is refused here, when the settings are built, with one line naming the options.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from taille.errors import TailleError
from taille.options import Count, coerce

KINDS = ("fkl", "rkl", "jsd")
STRATEGIES = ("auto", "ddp", "fsdp")
ON_POLICY_FROM = ("end", "reply")
LOSS_ON = ("all", "replies")
from taille.models.precision import check_precision
TRACKERS = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}


@dataclass(frozen=True)
class LossConfig:
    kind: str = field(default="fkl", metadata={"flag": "loss"})
    """fkl (forward KL, Minitron), rkl (reverse KL) or jsd (generalised JSD)."""
    beta: float = 0.5
    """JSD interpolation."""
    temperature: float = 1.0
    """Softmax temperature of both models (a teacher cache must have been built at the same one)."""
    ce_weight: float = 0.0
    """Weight of cross-entropy on the data's next tokens (0: pure distillation)."""
    kd_weight: float | None = None
    """Weight of the distillation term (default: 1 with a teacher, 0 without one)."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TailleError(f"--loss {self.kind}: use one of {', '.join(KINDS)}")
        if not 0 < self.beta < 1:
            raise TailleError(f"--beta {self.beta}: must be strictly between 0 and 1")
        if self.temperature <= 0:
            raise TailleError(f"--temperature {self.temperature}: must be positive")
        if self.ce_weight < 0 or (self.kd_weight or 0) < 0:
            raise TailleError("--ce-weight and --kd-weight must be non-negative")
        if self.kd_weight is not None and self.ce_weight + self.kd_weight == 0:
            raise TailleError("--ce-weight and --kd-weight are both 0: nothing to train on")

    @property
    def kd(self) -> float:
        """The distillation weight the loss applies (None, the default, is 1: the loss has a teacher)."""
        return 1.0 if self.kd_weight is None else self.kd_weight


def cache_meta(folder: str) -> dict:
    """A teacher cache's meta.json (written last, so its presence marks a complete cache)."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise TailleError(f"--teacher-cache {folder}: no complete cache here (build one with `taille teacher-cache`)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TailleError(f"--teacher-cache {folder}: meta.json is not valid JSON (rebuild the cache)") from None


@dataclass
class DistillConfig:
    student: str
    """The model to train (e.g. a `taille prune` output)."""
    out: str
    """Output folder: the student, checkpoints/, metrics.jsonl, curves.png."""
    data: str | None = None
    """Training text (shakespeare = its training plays; files; hf://...), or a weighted mixture
    shakespeare:0.5,gen.jsonl:0.5."""
    teacher: str | None = None
    """The frozen teacher (omit for CE-only training with --ce-weight > 0)."""
    teacher_cache: str | None = None
    """A `taille teacher-cache` folder to train from instead of a teacher in memory (it holds its own
    blocks: no --data)."""
    eval_data: str | None = "auto"
    """Held-out text; auto = shakespeare's held-out plays when training on shakespeare (alone or in a
    mixture); none to skip."""
    tokens: Count = 1_000_000
    """Training budget in tokens (2M, 1.5B, ...)."""
    seq_len: int = 512
    """Tokens per block."""
    batch_size: int = 8
    """Blocks per process per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate (Minitron: 1e-4)."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine."""
    warmup: int = 40
    """Linear warm-up steps, then cosine decay to --min-lr."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices."""
    clip: float = 1.0
    """Gradient-norm clipping (0: off)."""
    loss: LossConfig = field(default_factory=LossConfig)
    hidden_layers: str | None = None
    """Also match intermediate hidden states (1 - cosine): 'auto' (4 student layers up to the last, each
    with the teacher layer it was pruned from) or STUDENT:TEACHER pairs like 8:14,17:29; a learned
    projection maps a narrower student to the teacher's width."""
    hidden_weight: float = 1.0
    """Weight of the hidden-state term."""
    on_policy: float = 0.0
    """Share of each step's blocks whose last --on-policy-tokens the student samples itself (temperature 1)
    before the teacher grades every position: on-policy distillation (GKD), which corrects the student in
    the states its own sampling reaches, such as the start of a loop. 0: the data's tokens only."""
    on_policy_tokens: int = 64
    """Tokens the student writes at the end of each on-policy block (the block's first seq_len minus these
    are its prompt)."""
    on_policy_from: str = "end"
    """Where the student's tokens start in an on-policy block: end (the last --on-policy-tokens) or reply
    (right after the first assistant header within them, so it writes a character's reply; blocks with
    none there keep the fixed tail)."""
    loss_on: str = "all"
    """Which tokens the loss counts: all, or replies (the assistant's turns in chat data, through their
    end-of-turn token; the card and the player's lines add nothing, and a source with no assistant turn at all,
    such as the plays in a mixture, counts every token), so a
    role-play corpus's budget goes to what the character says rather than to its card
    (taille/distill/replies.py). The held-out evaluation reads every token either way."""
    precision: str = "auto"
    """auto (bf16-mixed on GPUs and on CPUs with AMX/AVX512-BF16, else fp32), bf16-mixed or fp32."""
    seed: int = 1234
    """Seed of data order and initialisation."""
    eval_every: int = 50
    """Optimizer steps between held-out evaluations."""
    eval_tokens: int = 32768
    """Held-out tokens per evaluation."""
    save_every: int = 100
    """Optimizer steps between checkpoints."""
    log_every: int = 5
    """Optimizer steps between metric lines."""
    resume: bool = False
    """Continue from OUT/checkpoints/latest, exactly (same data order, optimizer and RNG state)."""
    progress: bool = True
    """Show a progress bar."""
    report_to: str = "none"
    """Also log to tensorboard (OUT/taille-distill) or wandb; none: metrics.jsonl and curves.png only."""
    strategy: str = "auto"
    """How N processes (`accelerate launch`, `torchrun`) share the student: ddp (a whole copy on each), fsdp
    (FSDP2: weights, gradients and AdamW state sharded by decoder layer), auto (fsdp when `accelerate config`
    chose FSDP, else ddp)."""
    shard_teacher: bool = False
    """Under fsdp, shard the frozen teacher's decoder layers too (its embeddings and head stay whole)."""
    sharded_checkpoints: bool = False
    """Under fsdp, each process writes its own shard of the weights and AdamW state, with no gather onto one
    process; a resume on another number of processes reassembles them."""
    activation_checkpointing: bool = False
    """Recompute the student's decoder-layer activations in the backward pass instead of keeping them
    (less memory, about a third more compute)."""

    def __post_init__(self):
        coerce(self)
        if self.strategy not in STRATEGIES:
            raise TailleError(f"--strategy {self.strategy}: use one of {', '.join(STRATEGIES)}")
        if self.strategy == "ddp" and (self.shard_teacher or self.sharded_checkpoints):
            raise TailleError("--shard-teacher and --sharded-checkpoints need --strategy fsdp (or auto under an "
                              "FSDP accelerate config)")
        if self.shard_teacher and not self.teacher:
            raise TailleError("--shard-teacher needs a live --teacher (a teacher cache holds no weights to shard)")
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        if self.eval_data == "none":
            self.eval_data = None
        has_teacher = bool(self.teacher or self.teacher_cache)
        if self.teacher_cache and self.teacher:
            raise TailleError("give --teacher or --teacher-cache, not both")
        if not has_teacher:
            if self.loss.kd_weight:
                raise TailleError(f"--kd-weight {self.loss.kd_weight} needs a --teacher or --teacher-cache "
                                  "(without one, train with --ce-weight > 0 alone)")
            if self.loss.ce_weight == 0:
                raise TailleError("without --teacher there is nothing to distil: give --teacher, --teacher-cache or "
                                  "--ce-weight > 0")
        # the KD term is on with a teacher and off without one unless a weight was given
        self.loss = dataclasses.replace(self.loss, kd_weight=self.loss.kd_weight if self.loss.kd_weight is not None
                                        else float(has_teacher))
        if self.hidden_layers and not (self.teacher and self.loss.kd_weight):
            raise TailleError("--hidden-layers compares the student's hidden states with a live --teacher's "
                              "(a teacher cache holds only logits)")
        if self.hidden_weight < 0:
            raise TailleError(f"--hidden-weight {self.hidden_weight} must be non-negative")
        if self.loss_on not in LOSS_ON:
            raise TailleError(f"--loss-on {self.loss_on}: use one of {', '.join(LOSS_ON)}")
        if self.loss_on == "replies" and (self.on_policy or self.hidden_layers):
            raise TailleError(f"--loss-on replies with --{'on-policy' if self.on_policy else 'hidden-layers'}: that term "
                              "is taken at every position; use --loss-on all with it")
        if self.on_policy:
            self._check_on_policy()
        elif self.on_policy_from != "end":
            raise TailleError(f"--on-policy-from {self.on_policy_from} needs --on-policy SHARE")
        if self.teacher_cache:
            self._check_cache()
        elif not self.data:
            raise TailleError("give --data (or a --teacher-cache, which holds its own blocks)")
        for name in ("tokens", "seq_len", "batch_size", "grad_accum", "eval_every", "eval_tokens", "save_every",
                     "log_every"):
            if getattr(self, name) < 1:
                raise TailleError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.seq_len < 2:
            raise TailleError(f"--seq-len {self.seq_len}: must be at least 2 (a block predicts its next tokens)")
        if self.lr <= 0 or self.warmup < 0 or self.weight_decay < 0 or self.clip < 0:
            raise TailleError("--lr must be positive; --warmup, --weight-decay and --clip non-negative")
        if not 0 <= self.min_lr <= self.lr:
            raise TailleError(f"--min-lr {self.min_lr} must be between 0 and --lr {self.lr}")
        check_precision(self.precision)
        if self.report_to != "none":
            import importlib.util

            if self.report_to not in TRACKERS:
                raise TailleError(f"--report-to {self.report_to}: use none, {', '.join(TRACKERS)}")
            module, install = TRACKERS[self.report_to]
            if importlib.util.find_spec(module) is None:
                raise TailleError(f"--report-to {self.report_to} needs the {module} package: {install}")

    def _check_on_policy(self) -> None:
        """The student's own samples need a live teacher to grade them, and a whole number of them per
        micro-batch (every process samples alike, so FSDP's gathers stay in step)."""
        if not 0 < self.on_policy <= 1:
            raise TailleError(f"--on-policy {self.on_policy}: a share between 0 and 1")
        if not (self.teacher and self.loss.kd):
            raise TailleError("--on-policy needs a live --teacher to grade the student's own tokens (a teacher cache "
                              "holds distributions at the data's tokens only)")
        if self.loss.ce_weight:
            raise TailleError("--on-policy with --ce-weight: the cross-entropy's targets would be the student's own "
                              "samples; use one or the other")
        per_batch = self.on_policy * self.batch_size
        if abs(per_batch - round(per_batch)) > 1e-6 or round(per_batch) < 1:
            shares = ", ".join(f"{k}/{self.batch_size}" for k in range(1, min(self.batch_size, 4) + 1))
            raise TailleError(f"--on-policy {self.on_policy} of --batch-size {self.batch_size} is {per_batch:g} blocks: "
                              f"give a whole number of blocks per micro-batch ({shares}, ...)")
        if self.on_policy_from not in ON_POLICY_FROM:
            raise TailleError(f"--on-policy-from {self.on_policy_from}: use one of {', '.join(ON_POLICY_FROM)}")
        if not 1 <= self.on_policy_tokens < self.seq_len:
            raise TailleError(f"--on-policy-tokens {self.on_policy_tokens}: between 1 and --seq-len - 1 "
                              f"({self.seq_len - 1}); the rest of the block is the prompt")

    def _check_cache(self) -> None:
        """What a cache fixes (its blocks, their length, the temperature its log-probs were taken at)
        must match: a mismatch would train on something else than asked, silently."""
        if self.data:
            raise TailleError("--teacher-cache holds its own blocks: leave out --data")
        if self.loss.kind != "fkl":
            raise TailleError("--teacher-cache stores top-K distributions for forward KL only (--loss fkl)")
        meta = cache_meta(self.teacher_cache)
        if meta["seq_len"] != self.seq_len:
            raise TailleError(f"--seq-len {self.seq_len} differs from the teacher cache's {meta['seq_len']}: "
                              f"give --seq-len {meta['seq_len']}")
        built_at = meta.get("temperature", 1.0)  # caches from before the option were built at 1
        if built_at != self.loss.temperature:
            raise TailleError(f"--temperature {self.loss.temperature}: the teacher cache holds log-probabilities at "
                              f"temperature {built_at}; give --temperature {built_at}, or build a cache with "
                              f"`taille teacher-cache --temperature {self.loss.temperature}`")
        if self.loss_on == "replies":
            from taille.data.mixture import parse_mixture

            if parse_mixture(meta.get("data", "")) is not None:
                raise TailleError("--loss-on replies with a teacher cache of a mixture: its rows come from several "
                                  "streams, so a row's first tokens cannot be placed in a reply; cache one source, "
                                  "or distil from a live --teacher")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CorrectConfig:
    """Teacher correction: the same loop as `distill`, cross-entropy only, at a low learning rate."""

    teacher: str
    """The teacher to correct."""
    data: str
    """The distillation data."""
    out: str
    """Folder for the corrected teacher."""
    tokens: Count = 1_000_000
    """Fine-tuning budget in tokens."""
    lr: float = 2e-5
    """Peak learning rate: low (Minitron: 1/5 of the original peak)."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine (default: --lr / 10)."""
    warmup: int = 20
    """Linear warm-up steps."""
    seq_len: int = 512
    """Tokens per block."""
    batch_size: int = 8
    """Blocks per process per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    loss_on: str = "all"
    """Which tokens the cross-entropy counts: all, or replies (the assistant's turns of chat data, as `taille
    distill --loss-on replies`): correct the teacher on the tokens the student will be distilled on, not on the
    cards and player lines it only reads."""
    precision: str = "auto"
    """auto, bf16-mixed or fp32 (see `taille distill -h`)."""
    seed: int = 1234
    """Seed of data order."""
    resume: bool = False
    """Continue from OUT/checkpoints/latest."""

    def __post_init__(self):
        coerce(self)
        self.distill_config()  # refuse bad values now, with the distillation's own checks

    def distill_config(self) -> DistillConfig:
        values = asdict(self)
        values["min_lr"] = self.lr / 10 if self.min_lr is None else self.min_lr
        return DistillConfig(student=values.pop("teacher"), loss=LossConfig(ce_weight=1.0, kd_weight=0.0), **values)


SAMPLINGS = ("top", "random")
"""What a teacher cache keeps per position: the K largest log-probabilities, or K draws."""


@dataclass
class TeacherCacheConfig:
    out: str
    """Folder for the cache."""
    teacher: str | None = None
    """The teacher model."""
    data: str | None = None
    """Training text to cache the teacher on."""
    from_cache: str | None = field(default=None, metadata={"flag": "from"})
    """Cut a smaller --top-k out of this cache instead (no teacher, no data: the same blocks)."""
    top_k: int = 128
    """Teacher log-probabilities kept per position (Minitron: K <= 100 hurt); with --sampling random, draws."""
    sampling: str = "top"
    """top: the K largest log-probabilities and the mass outside them; random: K draws from the teacher,
    stored as the drawn ids' frequencies, an unbiased estimate of its whole distribution (Sparse Logit
    Sampling, ACL 2025)."""
    seed: int | None = None
    """Seed of --sampling random (default 0)."""
    temperature: float = 1.0
    """Softmax temperature of the stored log-probabilities (distill with the same --temperature)."""
    seq_len: int = 512
    """Tokens per block."""
    tokens: Count | None = None
    """Cache only the first N tokens of the data."""
    batch_size: int = 8
    """Blocks per forward pass."""
    dtype: str = "auto"
    """Weight dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    precision: str = "auto"
    """auto (bf16-mixed where the hardware has fast bf16, else fp32), bf16-mixed or fp32."""

    def __post_init__(self):
        coerce(self)
        if self.from_cache is not None:
            if self.teacher or self.data or self.tokens or self.temperature != 1.0 or self.sampling != "top":
                raise TailleError("--from reuses a cache's teacher, data, blocks and temperature: leave out --teacher, "
                                  "--data, --tokens, --temperature and --sampling")
        elif not self.teacher or not self.data:
            raise TailleError("give --teacher and --data (or --from CACHE to cut a smaller K out of an existing cache)")
        if self.top_k < 1 or self.seq_len < 2 or self.batch_size < 1 or (self.tokens is not None and self.tokens < 1):
            raise TailleError("--top-k, --batch-size and --tokens must be at least 1, --seq-len at least 2")
        if self.temperature <= 0:
            raise TailleError(f"--temperature {self.temperature}: must be positive")
        if self.sampling not in SAMPLINGS:
            raise TailleError(f"--sampling {self.sampling}: one of {', '.join(SAMPLINGS)}")
        if self.seed is not None and self.sampling != "random":
            raise TailleError("--seed sets the draws of --sampling random; a top-K cache has none")
        check_precision(self.precision)
