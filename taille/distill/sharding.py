"""How N processes share a distillation, and the checkpoints each way writes and reads back.

ddp   accelerate wraps the student in DistributedDataParallel: a whole copy per process.
fsdp  FSDP2 (torch's `fully_shard`): each student decoder layer is one unit, and the rest (embeddings, final
      norm, LM head, the --hidden-layers projections) the root unit, so the sliced head loss, which runs
      inside the root's forward, sees whole weights while they are gathered. Weights, gradients and AdamW
      state are sharded; with --shard-teacher the frozen teacher's decoder layers are too.

`accelerate launch` configured for FSDP (`accelerate config`, fsdp_version 2) selects fsdp; accelerate's
own FSDP path does not run on CPUs (it leaves a gloo group to DDP), so the sharding is applied here, for
CPUs and GPUs alike. Checkpoints are full (rank 0 gathers and writes the single-process layout, which any
number of processes can resume) or sharded (each process writes its own shard; the same number of
processes loads its shards directly, another number reassembles them first).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch

from taille.errors import TailleError

log = logging.getLogger(__name__)


def _env(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1", "yes")


def resolve_strategy(requested: str, world: int) -> str:
    """single, ddp or fsdp, from --strategy and what `accelerate launch` was configured for; refuses the
    setups this loop cannot run, at start, in one line."""
    if _env("ACCELERATE_USE_DEEPSPEED"):
        raise TailleError("accelerate is configured for DeepSpeed, which taille's distillation loop does not run: "
                          "use FSDP (`accelerate config`: FSDP, fsdp_version 2) or DDP (multi-GPU)")
    if _env("ACCELERATE_USE_MEGATRON_LM"):
        raise TailleError("accelerate is configured for Megatron-LM, which taille's distillation loop does not run: "
                          "use FSDP (fsdp_version 2) or DDP")
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        raise TailleError(f"accelerate is configured for mixed_precision {os.environ['ACCELERATE_MIXED_PRECISION']}; "
                          "taille's --precision chooses (bf16-mixed or fp32): set mixed_precision: 'no' in the "
                          "accelerate config")
    fsdp_env = _env("ACCELERATE_USE_FSDP")
    if fsdp_env and os.environ.get("FSDP_VERSION", "1") != "2":
        raise TailleError("accelerate is configured for FSDP version 1; taille shards with FSDP2: set "
                          "fsdp_version: 2 in the accelerate config file")
    if requested == "ddp" and fsdp_env:
        raise TailleError("--strategy ddp, but accelerate is configured for FSDP: use --strategy fsdp (or auto), "
                          "or an accelerate config without FSDP")
    strategy = "fsdp" if requested == "fsdp" or fsdp_env else "ddp"
    if world == 1:
        if strategy == "fsdp":
            log.info("fsdp on one process: nothing to shard, training the whole student here")
        return "single"
    return strategy


def tied_groups(module: torch.nn.Module) -> list[list[str]]:
    """Names that share one parameter (a tied embedding and head), each group sorted: the first name is the
    one a checkpoint stores."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return [sorted(names) for names in by_tensor.values() if len(names) > 1]


def shard(trunk: torch.nn.Module, teacher: torch.nn.Module | None, layers_of, shard_teacher: bool,
          precision: str) -> None:
    """FSDP2 in place: every student decoder layer, then the trunk as root; the teacher's decoder layers
    when asked (each gathered for its forward and freed after it). Under bf16-mixed the gathered weights are
    bf16 (FSDP's mixed precision; gradients reduced in fp32): autocast's own bf16 copies of fp32 weights
    would stay alive until backward, whole, one per layer, undoing the sharding."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16-mixed" else MixedPrecisionPolicy())
    for layer in layers_of(trunk.lm):
        fully_shard(layer, mp_policy=policy)
    # the root's inputs keep their dtypes: a teacher cache's fp32 log-probabilities must not be rounded
    fully_shard(trunk, mp_policy=MixedPrecisionPolicy(policy.param_dtype, policy.reduce_dtype, cast_forward_inputs=False))
    if teacher is not None and shard_teacher:
        for layer in layers_of(teacher):
            fully_shard(layer, reshard_after_forward=True, mp_policy=policy)


@contextlib.contextmanager
def kept_gathered(module: torch.nn.Module):
    """Inside, `module`'s FSDP units keep their weights gathered between forward passes (a token-by-token
    decode would otherwise gather every layer again for each token); freed on the way out. Nothing to do
    without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """Total gradient norm over all processes' shards (0-d, plain tensor), and the gradients scaled to at most
    `max_norm` (inf: measured, not clipped)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm != float("inf"):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            (g._local_tensor if isinstance(g, DTensor) else g).mul_(coef)
    return norm


# --- state dicts keyed by parameter index (the checkpoint layout) or by name (torch's distributed API) ----


def parameter_order(module: torch.nn.Module, optimizer) -> list[list[str]]:
    """For each parameter in the optimizer's order (what a checkpoint's indices count), all its names."""
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def to_index(named: dict, order: list[list[str]]) -> dict:
    position = {name: i for i, aliases in enumerate(order) for name in aliases}
    return {"state": {position[name]: values for name, values in named["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in named["param_groups"]]}


def to_named(indexed: dict, order: list[list[str]]) -> dict:
    return {"state": {order[int(i)][0]: values for i, values in indexed["state"].items()},
            "param_groups": [{**g, "params": [order[i][0] for i in g["params"]]} for g in indexed["param_groups"]]}


# --- checkpoints ------------------------------------------------------------------------------------


def _tag(rank: int, world: int) -> str:
    return f".rank-{rank:05d}-of-{world:05d}"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_fsdp(out: Path, step: int, trunk, optimizer, cfg, state: dict, groups: list[list[str]], order,
              rank: int, world: int, sharded: bool) -> Path | None:
    """A checkpoint of a sharded trunk, every process calling (the gathers are collective); returns its
    folder on rank 0."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    from taille.distill.checkpoint import _save_optimizer, begin_checkpoint, publish_checkpoint, write_state

    aliases = {name for group in groups for name in group[1:]}
    if not sharded:
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = get_model_state_dict(trunk, options=full)  # on rank 0; {} elsewhere
        optim = get_optimizer_state_dict(trunk, optimizer, options=full)
        final = None
        if rank == 0:
            tmp = begin_checkpoint(out, step)
            for part in ("lm", "projections"):
                tensors = {k[len(part) + 1:]: v.contiguous() for k, v in model.items()
                           if k.startswith(part + ".") and k not in aliases}
                if tensors:
                    save_file(tensors, str(tmp / ("student" if part == "lm" else part)) + ".safetensors")
            _save_optimizer(to_index(optim, order), tmp)
            write_state(tmp, step, cfg, state)
            final = publish_checkpoint(out, step)
        _barrier()
        return final
    model = get_model_state_dict(trunk)
    optim = to_index(get_optimizer_state_dict(trunk, optimizer), order)
    if rank == 0:
        tmp = begin_checkpoint(out, step)
    _barrier()
    tmp = out / "checkpoints" / f".tmp-step-{step:07d}"
    _shared_or_refuse([] if tmp.is_dir() else [rank], tmp)
    local = lambda v: v.to_local() if isinstance(v, DTensor) else v  # noqa: E731
    save_file({k: local(v).contiguous() for k, v in model.items() if k not in aliases},
              str(tmp / f"trunk{_tag(rank, world)}.safetensors"))
    optim_local = {"state": {i: {n: local(v) for n, v in values.items()} for i, values in optim["state"].items()},
                   "param_groups": optim["param_groups"]}
    _save_optimizer(optim_local, tmp, shard=_tag(rank, world), json_too=rank == 0)
    if rank == 0:
        (tmp / "shards.json").write_text(json.dumps({
            "processes": world,
            "model": sorted(k for k, v in model.items() if isinstance(v, DTensor) and k not in aliases),
            "optimizer": sorted(f"state.{i}.{n}" for i, values in optim["state"].items()
                                for n, v in values.items() if isinstance(v, DTensor)),
        }))
    _barrier()
    _shared_or_refuse([r for r in range(world) if not (tmp / f"trunk{_tag(r, world)}.safetensors").is_file()]
                      if rank == 0 else [], tmp)
    final = None
    if rank == 0:
        write_state(tmp, step, cfg, state)
        final = publish_checkpoint(out, step)
    _barrier()
    return final


def _shared_or_refuse(missing: list[int], tmp: Path) -> None:
    """Every process refuses at once when some process cannot see the checkpoint folder (node-local disks)."""
    import torch.distributed as dist

    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, missing)
    missing = sorted({r for m in seen for r in m})
    if missing:
        raise TailleError(f"--sharded-checkpoints: processes {missing} cannot see {tmp}; OUT must be on a filesystem "
                          "every process shares, or drop --sharded-checkpoints (rank 0 then gathers and writes)")


def _reassemble(checkpoint: Path, stem: str, processes: int, sharded: list[str]) -> dict:
    """One process's view of a sharded checkpoint's whole tensors: FSDP2 shards dim 0 in rank order."""
    from safetensors.torch import load_file

    parts = [load_file(str(checkpoint / f"{stem}{_tag(r, processes)}.safetensors")) for r in range(processes)]
    cut = set(sharded)
    return {k: torch.cat([p[k] for p in parts]) if k in cut else v for k, v in parts[0].items()}


def restore(checkpoint: Path, trunk, optimizer, strategy: str, groups: list[list[str]], order,
            rank: int, world: int) -> None:
    """Weights, optimizer state and generators of `checkpoint` into the run's (sharded or whole) trunk."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from taille.distill.checkpoint import load_training_state

    fsdp = strategy == "fsdp"
    shards_json = checkpoint / "shards.json"
    try:
        if shards_json.is_file():
            meta = json.loads(shards_json.read_text())
            if fsdp and meta["processes"] == world:
                return _restore_own_shards(checkpoint, trunk, optimizer, rank, world, meta, groups, order)
            log.info("%s: reassembling %d shards for %d process(es)", checkpoint, meta["processes"], world)
            model = _reassemble(checkpoint, "trunk", meta["processes"], meta["model"])
            optim_tensors = _reassemble(checkpoint, "optimizer", meta["processes"], meta["optimizer"])
        else:
            model = {f"lm.{k}": v for k, v in load_file(str(checkpoint / "student.safetensors")).items()}
            if (checkpoint / "projections.safetensors").is_file():
                model.update({f"projections.{k}": v
                              for k, v in load_file(str(checkpoint / "projections.safetensors")).items()})
            optim_tensors = None
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise TailleError(f"--resume: {checkpoint} is damaged ({' '.join(str(e).split())[:200]}); start without "
                          f"--resume, or delete {checkpoint.parent} to start over") from None
    for group in groups:  # a tied weight is stored once, under whichever of its names
        present = [n for n in group if n in model]
        for name in group:
            if present and name not in model:
                model[name] = model[present[0]]
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(trunk, model, options=full)
        load = lambda indexed: set_optimizer_state_dict(trunk, optimizer, to_named(indexed, order), options=full)  # noqa: E731
    else:
        trunk.load_state_dict(model)
        load = optimizer.load_state_dict
    load_training_state(checkpoint, optimizer, load, tensors=optim_tensors)


def _restore_own_shards(checkpoint: Path, trunk, optimizer, rank: int, world: int, meta: dict, groups, order) -> None:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    from taille.distill.checkpoint import load_training_state

    reference = get_model_state_dict(trunk)

    def placed(name: str, tensor: torch.Tensor):
        ref = reference[name]
        if not isinstance(ref, DTensor):
            return tensor
        return DTensor.from_local(tensor.to(ref.to_local().device), ref.device_mesh, ref.placements,
                                  shape=ref.shape, stride=ref.stride())

    local = {k: placed(k, v) for k, v in load_file(str(checkpoint / f"trunk{_tag(rank, world)}.safetensors")).items()}
    for group in groups:
        for name in group[1:]:
            local[name] = local[group[0]]
    set_model_state_dict(trunk, local)
    sharded = set(meta["optimizer"])

    def load(indexed: dict) -> None:
        named = to_named(indexed, order)
        for (name, values), index in zip(list(named["state"].items()), indexed["state"]):
            named["state"][name] = {n: placed(name, v) if f"state.{index}.{n}" in sharded else v
                                    for n, v in values.items()}
        set_optimizer_state_dict(trunk, optimizer, named)

    tensors = load_file(str(checkpoint / f"optimizer{_tag(rank, world)}.safetensors"))
    load_training_state(checkpoint, optimizer, load, tensors=tensors)
