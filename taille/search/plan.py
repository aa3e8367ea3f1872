"""`taille plan`: the shapes a model could be pruned to for a parameter or memory budget, from its config
alone (no weights): exact parameter counts, weight size at each quantization and the KV cache.

The grid follows Minitron's search space: layers (down to half), hidden in the model's own granularity
(a multiple of 32 for GGUF blocks and of the head count where transformers requires it; of 64 at least
for models wider than 2048), MLP in multiples of 256 (32 below 2048), query heads per KV group; KV heads
and head_dim stay.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from taille.distill.memory import DistillMemorySettings
from taille.errors import TailleError
from taille.options import Bytes, Count, coerce
from taille.models import quant as formats
from taille.models.arch import get_arch, head_dim
from taille.models.summary import QUANT_BITS
from taille.prune.shape import Shape, count_params, hidden_step, shape_of

GiB = 2**30


@dataclass
class Candidate:
    shape: Shape
    params: int
    weights_gib: dict[str, float]
    """Weight size per quantization (2-D tensors at the format's bits, 1-D at fp32)."""
    kv_cache_gib: float
    """fp16 K and V for one sequence of `context` tokens."""
    balance: float
    """Largest fraction any axis loses (the search prefers even cuts)."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = self.shape.to_dict()
        return d


@dataclass
class PlanSettings:
    params: Count | None = None
    """Parameter target (8B, 90M)."""
    memory: Bytes | None = None
    """Memory budget on the player's device, weights + KV cache: 6G, 6GB, 6GiB, 6.5 GB or 512M (G = 2^30 bytes,
    as memory is sold)."""
    quant: str = "q4_k_m"
    """Quantization the memory budget assumes: bf16, q8_0, q4_k_m, q4_0."""
    context: int = 4096
    """Context length the KV cache must hold."""
    tolerance: float = 0.05
    """How far from the target a candidate may land."""
    top: int = 20
    """Rows to print (the JSON has them all)."""
    distill: bool = False
    """Plan the memory of distilling MODEL (the teacher) into --student instead: what one GPU holds under DDP,
    FSDP and FSDP + teacher cache, and the fewest GPUs that fit --gpu-memory."""
    training: DistillMemorySettings = field(default_factory=DistillMemorySettings)

    def __post_init__(self):
        coerce(self)
        if isinstance(self.training, dict):
            self.training = DistillMemorySettings(**self.training)
        if self.distill:
            if self.params is not None or self.memory is not None:
                raise TailleError("--distill plans the memory of training: leave out --params and --memory (pruning targets)")
            if not self.training.student and not self.training.recipe:
                raise TailleError("--distill needs the student: --student FOLDER, --student hidden=3072,ffn=9216 (a shape "
                                  "cut from MODEL) or --recipe RECIPE")
            return
        if self.training != DistillMemorySettings():
            raise TailleError("--student, --recipe, --gpus, --gpu-memory, --batch-size, --seq-len ... plan distillation "
                              "memory: add --distill")
        if (self.params is None) == (self.memory is None):
            raise TailleError("give a target: --params 8B or --memory 6GB (not both)")
        if self.quant not in QUANT_BITS:
            raise TailleError(f"--quant {self.quant}: use one of {', '.join(QUANT_BITS)}")
        if self.context < 1 or self.top < 1 or (self.params is not None and self.params < 1) or (
                self.memory is not None and self.memory < 1):
            raise TailleError("--context, --top, --params and --memory must be positive")
        if not 0 < self.tolerance < 0.5:
            raise TailleError(f"--tolerance {self.tolerance}: a fraction between 0 and 0.5")


def weight_bytes(config, s: Shape, quant: str) -> float:
    """Bytes of the weights of `config` at shape `s` in format `quant`: norms (1-D) stay fp32."""
    arch = get_arch(config)
    total = count_params(config, s)
    vectors = s.hidden * (1 + s.layers * len(arch.layer_norms)) + s.layers * 2 * head_dim(config) * arch.qk_norm
    return formats.weight_bytes(total - vectors, vectors, quant)


def kv_cache_bytes(config, s: Shape, context: int) -> int:
    return formats.kv_cache_bytes(s.layers, s.kv_heads, head_dim(config), context)


def _grid(config, base: Shape):
    group = base.heads // base.kv_heads
    for layers in range(max(1, base.layers // 2), base.layers + 1):
        for per_group in range(1, group + 1):
            heads = per_group * base.kv_heads
            step = hidden_step(config, heads)  # the model's own granularity (heads rule, GGUF blocks)
            step = math.lcm(step, 64) if base.hidden >= 2048 else step  # a coarser grid for large models
            for hidden in range(step, base.hidden + 1, step):
                if hidden >= base.hidden // 2 or hidden == base.hidden:
                    yield layers, heads, hidden


def plan(config, params: int | None = None, memory_gib: float | None = None, quant: str = "q4_k_m",
         context: int = 4096, tolerance: float = 0.05) -> list[Candidate]:
    """Every grid shape within `tolerance` of the parameter target, or using (1 - 2 tolerance) to 100% of
    the memory budget at `quant` with the KV cache of `context` tokens; width-only shapes first (most even cut first), then shapes that also drop layers."""
    if (params is None) == (memory_gib is None):
        raise TailleError("give a target: --params 8B or --memory 6GB (not both)")
    if quant not in QUANT_BITS:
        raise TailleError(f"--quant {quant}: use one of {', '.join(QUANT_BITS)}")
    base = shape_of(config)
    mlp_step = 256 if base.ffn >= 2048 else 32
    out = []
    for layers, heads, hidden in _grid(config, base):
        partial = Shape(hidden, 0, heads, base.kv_heads, layers)
        at0 = count_params(config, partial)
        per_neuron = count_params(config, Shape(hidden, 1, heads, base.kv_heads, layers)) - at0
        if params is not None:
            lo, hi = params * (1 - tolerance), params * (1 + tolerance)
        else:
            kv = kv_cache_bytes(config, partial, context)
            bits = QUANT_BITS[quant] / 8
            lo = ((1 - 2 * tolerance) * memory_gib * GiB - kv) / bits
            hi = (memory_gib * GiB - kv) / bits
        first = max(mlp_step, math.ceil((lo - at0) / per_neuron / mlp_step) * mlp_step)
        for ffn in range(first, base.ffn + 1, mlp_step):
            s = Shape(hidden, ffn, heads, base.kv_heads, layers)
            n = count_params(config, s)
            if n > hi * 1.02:  # the memory bound is on bytes, checked exactly below
                break
            weights = {q: weight_bytes(config, s, q) / GiB for q in QUANT_BITS}
            kv_gib = kv_cache_bytes(config, s, context) / GiB
            if params is not None and not lo <= n <= hi:
                continue
            if memory_gib is not None and not (1 - 2 * tolerance) * memory_gib <= weights[quant] + kv_gib <= memory_gib:
                continue
            balance = max(1 - hidden / base.hidden, 1 - ffn / base.ffn, 1 - heads / base.heads, 1 - layers / base.layers)
            out.append(Candidate(s, n, {q: round(v, 3) for q, v in weights.items()}, round(kv_gib, 3), round(balance, 4)))
    if not out and memory_gib is not None:
        whole = {q: weight_bytes(config, base, q) / GiB for q in QUANT_BITS}
        kv_gib = kv_cache_bytes(config, base, context) / GiB
        if whole[quant] + kv_gib <= memory_gib:  # the budget holds the model as it is: say so, cut nothing
            return [Candidate(base, count_params(config), {q: round(v, 3) for q, v in whole.items()}, round(kv_gib, 3), 0.0)]
    if not out:
        raise TailleError("no shape on the grid meets this target; widen --tolerance or change the target")
    # Minitron's width recipe first (every layer kept, the most even cut of the widths), then shapes that
    # also drop layers, least depth cut first: at equal size width pruning distils back better (MINITRON.md)
    return sorted(out, key=lambda c: (c.shape.layers < base.layers, base.layers - c.shape.layers, c.balance,
                                      abs(c.params - params) if params is not None else -c.params))
