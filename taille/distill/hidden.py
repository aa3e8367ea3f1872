"""Intermediate hidden-state loss: the student's residual stream after chosen layers should point where
the teacher's does (Minitron adds this to the logit loss, mainly for depth-pruned students).

For each pair (student layer i, teacher layer j) the loss per token is 1 - cos(P_i h_s, h_t), where h
are the outputs of those decoder layers and P_i a learned linear map from the student's width to the
teacher's (none when the widths match). A width-pruned student's residual channels are a subset of the
teacher's, so when its `taille.json` names the kept channels P_i starts as that scatter, exact at step 0.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from taille.errors import TailleError
from taille.models.arch import get_arch


def parse_pairs(spec: str, student_layers: int, teacher_layers: int, kept_layers: list[int] | None,
                auto_count: int = 4) -> list[tuple[int, int]]:
    """'auto' or 'S:T,S:T' (0-based decoder layer indices, negative from the end) -> [(s, t), ...].

    auto: `auto_count` student layers evenly spaced up to the last; each paired with the teacher layer it
    came from when the prune record says (kept layers), else the teacher layer at the same depth fraction.
    """
    if spec == "auto":
        count = min(auto_count, student_layers)
        chosen = sorted({round((k + 1) * student_layers / count) - 1 for k in range(count)})
        if kept_layers is not None and len(kept_layers) == student_layers:
            return [(s, kept_layers[s]) for s in chosen]
        return [(s, round((s + 1) * teacher_layers / student_layers) - 1) for s in chosen]
    pairs = []
    for item in spec.split(","):
        try:
            s, t = (int(x) for x in item.split(":"))
        except ValueError:
            raise TailleError(f"--hidden-layers: '{item}' is not STUDENT:TEACHER (layer indices, e.g. 11:23)") from None
        for value, n, who in ((s, student_layers, "student"), (t, teacher_layers, "teacher")):
            if not -n <= value < n:
                raise TailleError(f"--hidden-layers: layer {value} does not exist in the {who} ({n} layers)")
        pairs.append((s % student_layers, t % teacher_layers))
    if len(set(pairs)) != len(pairs):
        raise TailleError(f"--hidden-layers: a pair is given twice in '{spec}'")
    return pairs


def projection(student_width: int, teacher_width: int, kept_hidden: list[int] | None) -> torch.nn.Module:
    """Student width -> teacher width: identity when equal, else a linear map (no bias), started as the
    scatter of the kept channels when they are known (P[kept[k], k] = 1)."""
    if student_width == teacher_width:
        return torch.nn.Identity()
    proj = torch.nn.Linear(student_width, teacher_width, bias=False)
    if kept_hidden is not None and len(kept_hidden) == student_width and max(kept_hidden) < teacher_width:
        with torch.no_grad():
            proj.weight.zero_()
            proj.weight[torch.tensor(kept_hidden), torch.arange(student_width)] = 1.0
    return proj


@contextlib.contextmanager
def layer_outputs(model, layers: list[int], into: dict):
    """While active, a forward of `model` stores the output (B, T, H) of each listed decoder layer in
    `into[layer]`."""
    stack = model.get_submodule(get_arch(model.config).layers)

    def hook(index):
        def store(_module, _inputs, output):
            into[index] = output[0] if isinstance(output, tuple) else output
        return store

    handles = [stack[i].register_forward_hook(hook(i)) for i in layers]
    try:
        yield into
    finally:
        for h in handles:
            h.remove()


def cosine_loss_sum(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor]) -> torch.Tensor:
    """Sum over pairs and tokens of 1 - cos(student, teacher); states (B, T, H_teacher) already projected."""
    total = student_states[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_states, teacher_states):
        total = total + (1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).sum()
    return total
