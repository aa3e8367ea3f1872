"""Distillation checkpoints: OUT/checkpoints/step-NNNNNNN folders and the `latest` pointer.

Nothing in a checkpoint is unpickled: a checkpoint folder may come from someone else, and a pickle runs
whatever code it names when it is loaded. Every tensor is stored as safetensors, the rest as JSON:

    student.safetensors          the student's weights
    projections.safetensors      the learned --hidden-layers projections, when there are any
    optimizer.safetensors        the optimizer's per-parameter tensors, as state.<param index>.<name>
    optimizer.json               its param_groups and any per-parameter value that is not a tensor
    rng.safetensors              torch's CPU (and CUDA) generator states, NumPy's MT19937 key
    rng.json                     Python's generator state, the rest of NumPy's
    state.json                   step, tokens, seconds, loss, and the run's configuration

Checkpoints written before this layout hold optimizer.pt and rng.pt (torch.save pickles); those are read
through torch's restricted unpickler only, and refused when it will not read them.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from taille.errors import TailleError

if TYPE_CHECKING:
    from taille.distill.config import DistillConfig

log = logging.getLogger(__name__)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(folder: Path, step: int, student, optimizer, cfg: DistillConfig, state: dict, keep: int = 2,
                    projections: torch.nn.Module | None = None) -> Path:
    """checkpoints/step-NNNNNNN (written to a temp folder, then renamed) and checkpoints/latest, from one
    process that holds the whole model. A crash while saving leaves the previous checkpoint and `latest`
    untouched."""
    from safetensors.torch import save_model

    tmp = begin_checkpoint(folder, step)
    save_model(student, str(tmp / "student.safetensors"))  # stores a tied weight once
    if projections is not None and len(list(projections.parameters())):
        save_model(projections, str(tmp / "projections.safetensors"))
    _save_optimizer(optimizer.state_dict(), tmp)
    write_state(tmp, step, cfg, state)
    return publish_checkpoint(folder, step, keep)


def begin_checkpoint(folder: Path, step: int) -> Path:
    """An empty temp folder for the checkpoint at `step` (call on one process)."""
    root = folder / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def write_state(tmp: Path, step: int, cfg: DistillConfig, state: dict) -> None:
    """The random generators and state.json: written last by the process that publishes."""
    _save_rng(_rng_state(), tmp)
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "config": cfg.to_dict()}, indent=1))


def publish_checkpoint(folder: Path, step: int, keep: int = 2) -> Path:
    """Rename the temp folder into place, point `latest` at it, and keep the newest `keep` checkpoints."""
    root = folder / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write(root / "latest", final.name)
    older = sorted(p for p in root.glob("step-*") if p != final)
    for old in older[: max(0, len(older) - (keep - 1))]:  # keep the newest `keep`, this one included
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    pointer = folder / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = folder / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_training_state(checkpoint_dir: Path, optimizer, load=None, tensors: dict | None = None) -> None:
    """Restore the optimizer's state and the Python, NumPy and torch random generators from a checkpoint,
    exactly as they were when it was saved (a resumed run then equals an uninterrupted one). `optimizer`
    is the one the run built, before accelerate wraps it; `load(state_dict)` puts a state dict keyed by
    parameter index in place (default: optimizer.load_state_dict; under FSDP it shards it); `tensors`
    are the optimizer tensors of a sharded checkpoint, reassembled."""
    load = load or optimizer.load_state_dict
    if tensors is not None or (checkpoint_dir / "optimizer.safetensors").is_file():
        from safetensors import SafetensorError

        # the safetensors layout wins: a stray optimizer.pt next to it is never opened
        try:
            load(_load_optimizer(checkpoint_dir, optimizer.defaults, tensors))
            _set_rng(_load_rng(checkpoint_dir))
        except (OSError, ValueError, KeyError, SafetensorError) as e:  # a truncated or hand-edited file
            raise TailleError(f"--resume: {checkpoint_dir} is damaged ({' '.join(str(e).split())[:200]}); start "
                              f"without --resume, or delete {checkpoint_dir.parent} to start over") from None
    else:
        load(_load_legacy(checkpoint_dir / "optimizer.pt"))
        _set_rng(_load_legacy(checkpoint_dir / "rng.pt"))
        log.info("%s: read an older checkpoint (optimizer.pt, rng.pt) through torch's restricted loader",
                 checkpoint_dir)


# --- the optimizer ----------------------------------------------------------------------------------


def _save_optimizer(state_dict: dict, folder: Path, shard: str = "", json_too: bool = True) -> None:
    """optimizer{shard}.safetensors (every tensor) and optimizer.json (param_groups and the rest) of a state
    dict keyed by parameter index; `shard` names one process's file of a sharded checkpoint."""
    from safetensors.torch import save_file

    tensors, values = {}, {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                values.setdefault(str(index), {})[name] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"optimizer{shard}.safetensors"))
    if json_too:
        (folder / "optimizer.json").write_text(json.dumps({"param_groups": state_dict["param_groups"], "state": values}))


def _load_optimizer(folder: Path, defaults: dict, tensors: dict | None = None) -> dict:
    """The state dict `_save_optimizer` wrote; `defaults` (the optimizer's own) give back the tuples JSON
    turned into lists. `tensors` replaces optimizer.safetensors (a sharded checkpoint's reassembled ones)."""
    from safetensors.torch import load_file

    saved = json.loads((folder / "optimizer.json").read_text())
    state = {int(index): values for index, values in saved["state"].items()}
    if tensors is None:
        tensors = load_file(str(folder / "optimizer.safetensors"))
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    # load_state_dict keeps the saved hyper-parameters as they are, and AdamW's betas is a tuple
    groups = [{key: tuple(value) if isinstance(defaults.get(key), tuple) else value for key, value in group.items()}
              for group in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


# --- random generators ------------------------------------------------------------------------------


def _rng_state() -> dict:
    """Every generator a training step may draw from (dropout, initialisations, samplers)."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _save_rng(rng: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    version, internal, gauss_next = rng["python"]
    kind, key, pos, has_gauss, cached_gaussian = rng["numpy"]
    tensors = {"torch": rng["torch"], "numpy.key": torch.from_numpy(key.astype(np.int64))}  # torch barely knows uint32
    tensors.update({f"cuda.{i}": state for i, state in enumerate(rng.get("cuda", []))})
    save_file(tensors, str(folder / "rng.safetensors"))
    (folder / "rng.json").write_text(json.dumps({
        "python": {"version": version, "internal": internal, "gauss_next": gauss_next},
        "numpy": {"kind": kind, "pos": pos, "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
    }))


def _load_rng(folder: Path) -> dict:
    from safetensors.torch import load_file

    saved = json.loads((folder / "rng.json").read_text())
    tensors = load_file(str(folder / "rng.safetensors"))
    python, numpy = saved["python"], saved["numpy"]
    key = tensors["numpy.key"].numpy().astype(np.uint32)
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(name.startswith("cuda.") for name in tensors))]
    return {"python": (python["version"], tuple(python["internal"]), python["gauss_next"]),
            "numpy": (numpy["kind"], key, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]),
            "torch": tensors["torch"], "cuda": cuda}


def _set_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    # a checkpoint from a GPU run resumed on a CPU has nothing to set them on; older ones have no "cuda"
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"][: torch.cuda.device_count()])


# --- checkpoints written before the safetensors layout ----------------------------------------------


def _numpy_globals() -> list:
    """What rng.pt needs besides tensors and containers: np.random.get_state()'s uint32 key, an array of a
    plain dtype. The restricted unpickler still refuses every other global. NumPy 2 renamed numpy.core to
    numpy._core, and a file names the one it was written with."""
    reconstruct = np.ndarray(0).__reduce__()[0]
    names = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
    uint32 = type(np.dtype(np.uint32))  # numpy.dtypes.UInt32DType: the unpickler sets the dtype's state through it
    return [np.ndarray, np.dtype, uint32, *((reconstruct, name) for name in names)]


def _load_legacy(path: Path):
    """optimizer.pt or rng.pt through torch's restricted unpickler (tensors, containers, numbers, and
    the NumPy array types above): a file that needs anything more is refused, never run."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TailleError(f"--resume: {path} is an older checkpoint file that cannot be loaded safely (it holds "
                          "more than tensors and numbers, and unpickling it could run any code); start without "
                          f"--resume, or delete {path.parent.parent} to start over") from None
    except (OSError, EOFError, RuntimeError) as e:  # missing, truncated or not a torch file at all
        raise TailleError(f"--resume: {path} cannot be read ({' '.join(str(e).split())[:200]}); start without "
                          f"--resume, or delete {path.parent.parent} to start over") from None
