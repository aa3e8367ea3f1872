"""`taille importance` and `taille prune`: scores in, a standard Hugging Face checkpoint out.

Order of work: importance on the unpruned model (one pass; the depth loss sweep only when asked), then
depth (drop layers), then width on the kept layers' scores. The output folder loads with plain
`AutoModelForCausalLM.from_pretrained` and carries `taille.json`: what was kept and why.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from taille.errors import TailleError
from taille.prune.config import (  # noqa: F401  (Calibration, Target re-exported)
    CRITERIA, DEPTH_CRITERIA, Calibration, ImportanceConfig, PruneConfig, Target,
)
from taille.prune.importance import (
    Importance, activation_importance, depth_loss_, load_importance, magnitude_importance,
    random_importance, save_importance,
)
from taille.prune.shape import Shape, check_shape, count_params, parse_params, search_shape, shape_of
from taille.prune.surgery import drop_layers_, prune_width_, select_width

log = logging.getLogger(__name__)



def parse_layers(text: str, n_layers: int) -> list[int]:
    """'14-25' or '3,5,10-12' (0-based, inclusive) -> sorted layer indices."""
    out = set()
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
        if not m:
            raise TailleError(f"--drop-layers {text}: expected 0-based indices and ranges such as 14-25 or 3,5,10-12")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo or hi >= n_layers:
            raise TailleError(f"--drop-layers {text}: the model has layers 0-{n_layers - 1}")
        out.update(range(lo, hi + 1))
    if len(out) >= n_layers:
        raise TailleError(f"--drop-layers {text} removes every layer")
    return sorted(out)


def resolve_shape(config, target: Target) -> tuple[Shape, list[int] | None]:
    """(shape to reach, explicit layers to drop or None)."""
    base = shape_of(config)
    if target.params is not None or target.ratio is not None:
        total = count_params(config)
        goal = parse_params(target.params) if target.params is not None else round(target.ratio * total)
        return search_shape(config, goal, tuple(target.axes), target.tolerance), None
    drop = parse_layers(target.drop_layers, base.layers) if target.drop_layers else None
    values = {**base.to_dict(), **target.explicit}
    if drop:
        values["layers"] = base.layers - len(drop)
    shape = Shape(**values)
    check_shape(config, shape)
    return shape, drop


def choose_layers_to_drop(scores: Importance, n_drop: int, criterion: str) -> list[int]:
    """Layers to remove: the n with the lowest single-layer BI or loss-without-it, or the contiguous block
    of n with the lowest BI (or loss, when measured for blocks of n)."""
    if n_drop == 0:
        return []
    if criterion == "contiguous":
        block = scores.block_loss.get(n_drop)
        if block is None:
            block = scores.block_bi[n_drop - 1][: len(scores.block_bi) - n_drop + 1]
        if torch.isnan(block).any():
            raise TailleError("contiguous depth pruning needs block importance from an activation pass (give --data)")
        start = int(torch.argmin(block))
        return list(range(start, start + n_drop))
    layer_scores = scores.layer_loss if criterion == "ppl" else scores.layer_bi
    if layer_scores is None or torch.isnan(layer_scores).any():
        raise TailleError(f"depth criterion {criterion} needs scores from `taille importance` "
                          f"{'--depth-metric ppl ' if criterion == 'ppl' else ''}(or --data)")
    return sorted(torch.argsort(layer_scores.float(), stable=True)[:n_drop].tolist())


def calibration_blocks(blocks, cal: Calibration, depth: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(calibration blocks, held-apart blocks for the depth loss or None): disjoint slices of `blocks` (one
    source's blocks, or a mixture's, whose every prefix holds the sources' shares)."""
    n_depth = min(cal.depth_samples, max(1, len(blocks) // 4)) if depth else 0
    available = len(blocks) - n_depth
    if available < cal.samples:
        log.warning("%s has %d blocks of %d tokens: using %d calibration samples instead of %d", cal.data,
                    len(blocks), cal.seq_len, available, cal.samples)
    calib = np.asarray(blocks[: min(cal.samples, available)])
    return calib, (np.asarray(blocks[len(blocks) - n_depth:]) if depth else None)


def compute_importance(model, tokenizer, cal: Calibration, criterion: str = "activation", depth_metric: str = "bi",
                       block_sizes=(1,), precision: str = "fp32", seed: int = 0) -> Importance:
    """Scores for `criterion`; activation scores (and depth losses) come from calibration data."""
    from taille.data.mixture import load_blocks, parse_mixture
    from taille.data.tokens import load_tokens

    if criterion not in CRITERIA:
        raise TailleError(f"--criterion {criterion}: use one of {', '.join(CRITERIA)}")
    if criterion == "magnitude":
        return magnitude_importance(model)
    if criterion == "random":
        return random_importance(model.config, seed)
    if parse_mixture(cal.data) is None:
        stream = load_tokens(cal.data, tokenizer, split="calib")
        blocks, source = stream.blocks(cal.seq_len), stream.meta["source"]
    else:  # a weighted mixture: its blocks interleave the sources, so any prefix holds their shares
        blocks, source = load_blocks(cal.data, tokenizer, cal.seq_len, split="calib"), cal.data
    calib, held = calibration_blocks(blocks, cal, depth=depth_metric == "ppl")
    scores = activation_importance(model, calib, cal.batch_size, precision)
    scores.meta.update(data=source, depth_metric=depth_metric)
    if depth_metric == "ppl":
        depth_loss_(scores, model, held, tuple(block_sizes), cal.batch_size, precision)
        scores.meta["depth_samples"] = len(held)
    return scores


def prune_(model, scores: Importance, shape: Shape, drop: list[int] | None = None,
           depth_criterion: str = "block-importance") -> dict:
    """Prune `model` in place to `shape`; return the record of what was kept."""
    if depth_criterion not in DEPTH_CRITERIA:
        raise TailleError(f"--depth-criterion {depth_criterion}: use one of {', '.join(DEPTH_CRITERIA)}")
    config = model.config
    before = shape_of(config)
    params_before = count_params(config)
    if drop is None:
        drop = choose_layers_to_drop(scores, before.layers - shape.layers, depth_criterion)
    kept_layers = drop_layers_(model, drop) if drop else list(range(before.layers))
    kept = torch.tensor(kept_layers)
    layer_scores = Importance(heads=scores.heads[kept], neurons=scores.neurons[kept], hidden=scores.hidden,
                              block_bi=scores.block_bi, criterion=scores.criterion)
    plan = select_width(layer_scores, config, shape)
    after = prune_width_(model, plan)
    assert after == shape, (after, shape)
    return {
        "shape_before": before.to_dict(), "shape_after": after.to_dict(),
        "params_before": params_before, "params_after": count_params(config),
        "criterion": scores.criterion, "depth_criterion": depth_criterion if drop else None,
        "kept": {"layers": kept_layers, **plan.to_dict()},
    }


def save_pruned(model, tokenizer, out: str | Path, record: dict) -> Path:
    """A standard Hugging Face folder (safetensors, config, generation config, tokenizer) + taille.json."""
    import taille

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.name_or_path = str(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "taille.json").write_text(json.dumps({"taille_version": taille.__version__, **record}, indent=1))
    return out


def importance_for_prune(model, tokenizer, scores_path, cal: Calibration | None, criterion: str,
                         depth_criterion: str, needs_depth: bool, precision: str, seed: int) -> Importance:
    """Scores from --scores or computed now from --data; a baseline criterion (magnitude, random)
    replaces the width scores and keeps the depth scores."""
    scores = None
    if scores_path is not None:
        scores = load_importance(scores_path, model.config)
    elif criterion == "activation" or needs_depth:
        if cal is None:
            raise TailleError("give --scores (from `taille importance`) or --data for calibration")
        depth_metric = "ppl" if needs_depth and depth_criterion == "ppl" else "bi"
        scores = compute_importance(model, tokenizer, cal, "activation", depth_metric, precision=precision)
    if criterion == "activation":
        return scores
    width = compute_importance(model, tokenizer, cal, criterion, seed=seed)
    if scores is None:
        return width
    scores.heads, scores.neurons, scores.hidden, scores.criterion = width.heads, width.neurons, width.hidden, criterion
    return scores


def run_importance(cfg: ImportanceConfig) -> Path:
    """`taille importance`: scores.safetensors, importance.json and PNG figures in `cfg.out`."""
    from taille.models.load import load_model, resolve_device
    from taille.models.precision import resolve_precision

    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    cal = cfg.calibration()
    scores = compute_importance(model, tokenizer, cal, "activation", cfg.depth_metric, cfg.block_sizes, precision)
    save_importance(scores, cfg.out, model.config, extra={"model": cfg.model, "calibration": vars(cal)})
    if cfg.figures:
        from taille.prune.figures import plot_importance

        plot_importance(scores, cfg.out)
    return Path(cfg.out)


def run_prune(cfg: PruneConfig) -> dict:
    """`taille prune`: load, score, prune, save. Returns the record written to taille.json."""
    from taille.models.load import load_config, load_model, resolve_device
    from taille.models.precision import resolve_precision

    config = load_config(cfg.model)
    shape, drop = resolve_shape(config, cfg.target)  # fail on a bad target before loading any weights
    needs_depth = shape.layers < config.num_hidden_layers and drop is None
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    scores = importance_for_prune(model, tokenizer, cfg.scores, cfg.calibration(), cfg.criterion, cfg.depth_criterion,
                                  needs_depth, precision, cfg.seed)
    record = prune_(model, scores, shape, drop, cfg.depth_criterion)
    record.update(source=cfg.model, target={k: v for k, v in vars(cfg.target).items() if k != "explicit"},
                  seed=cfg.seed, importance={k: v for k, v in scores.meta.items() if not isinstance(v, list)})
    save_pruned(model, tokenizer, cfg.out, record)
    return record
