"""The distillation memory plan (taille/distill/memory.py) against independent counts: autograd's saved
tensors, the bytes a real tiny distillation step holds at its peak, and a count by hand; then its
behaviour on the published shapes (more GPUs never need more, the no-fit line) and `taille plan --distill`."""

from __future__ import annotations

import json

import pytest
import torch

from taille.distill.memory import (
    SETUPS, DistillMemorySettings, Dims, activation_bytes, advice, fewest_gpus, live_bytes, per_gpu, plan_memory,
)
from taille.prune.shape import Shape
from tests.conftest import run_cli, save_tiny, tiny_config
from tests.search.test_plan import LLAMA_31_8B, NEMO_12B

MN_MINITRON_8B = Shape(4096, 11520, 32, 8, 40)
LLAMA_MINITRON_4B = Shape(3072, 9216, 32, 8, 32)


def saved_by_autograd(model, ids, bf16: bool) -> int:
    """Bytes of the distinct storages (weights aside) that autograd saves for backward in the forward pass
    the loop runs, `hidden_states`."""
    from taille.models.lm import hidden_states

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with context, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden_states(model, ids)
    return sum(saved.values())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-mixed"])
def test_activations_are_what_autograd_saves(family, bf16):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(family, layers=3)
    model = AutoModelForCausalLM.from_config(config)
    B, T = 3, 40
    ids = torch.randint(3, config.vocab_size, (B, T))
    dims = Dims.of(config)
    planned = activation_bytes(dims, B, T, 2 if bf16 else 4)["kept"]
    planned -= 4 * B * T * dims.hidden  # the final hidden states: the loop holds them, autograd does not
    planned += 2 * dims.linear_params if bf16 else 0  # autocast's bf16 weight copies are saved for backward too
    saved = saved_by_autograd(model, ids, bf16)
    if family == "gemma3":  # sandwich norms, counted approximately
        assert saved == pytest.approx(planned, rel=0.05)
    else:
        assert saved == planned


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-mixed"])
def test_activation_checkpointing_keeps_each_layer_input(bf16):
    from transformers import AutoModelForCausalLM

    from taille.distill.train import checkpoint_activations
    from taille.models.lm import hidden_states

    config = tiny_config("llama", layers=4)
    model = AutoModelForCausalLM.from_config(config).train()
    checkpoint_activations(model)  # what the loop does (and transformers' Trainer)
    B, T = 3, 40
    ids = torch.randint(3, config.vocab_size, (B, T))
    dims = Dims.of(config)
    tracker = live_bytes()
    for t in (*model.parameters(), ids):
        tracker.register(t)
    before = tracker.now
    with tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        final = hidden_states(model, ids)  # (B, T, H): held, as the loop holds it
        kept = tracker.now - before
    assert final.requires_grad
    planned = activation_bytes(dims, B, T, 2 if bf16 else 4, checkpointing=True)["kept"] - 8 * B * T
    planned += 2 * dims.linear_params if bf16 else 0
    assert kept == pytest.approx(planned, abs=1024)  # position ids and the like: a few hundred bytes


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    data = root / "train.txt"
    data.write_text("when shall we three meet again in thunder lightning or in rain upon the heath " * 200)
    pairs = {}
    for tied in (False, True):
        pairs[tied] = (save_tiny(root / f"teacher-{tied}", seed=1, tied=tied), save_tiny(root / f"student-{tied}", seed=2, tied=tied))
    return pairs, data, root


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("precision,batch,seq,checkpointing", [
    ("fp32", 4, 32, False), ("bf16-mixed", 4, 32, False), ("bf16-mixed", 2, 64, False), ("bf16-mixed", 4, 32, True)])
def test_a_tiny_distillation_step_peaks_at_the_planned_bytes(tiny_pair, tied, precision, batch, seq, checkpointing):
    from taille.distill.config import DistillConfig
    from taille.distill.memory import resolve
    from taille.distill.train import setup, train_step

    (teacher, student), data, root = tiny_pair[0][tied], tiny_pair[1], tiny_pair[2]
    run = setup(DistillConfig(student=str(student), teacher=str(teacher), data=str(data), out=str(root / "out"),
                              eval_data=None, seq_len=seq, batch_size=batch, precision=precision, progress=False,
                              activation_checkpointing=checkpointing))
    train_step(run, 0)  # AdamW's moments appear at the first update
    tracker = live_bytes()
    state = [t for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    for t in (*run.trunk.parameters(), *run.teacher.parameters(), *state):
        tracker.register(t)
    with tracker:
        train_step(run, 1)
    settings = DistillMemorySettings(student=str(student), gpus=1, batch_size=batch, seq_len=seq, grad_accum=1,
                                     precision=precision, device="cpu", activation_checkpointing=checkpointing)
    t, s, settings = resolve(str(teacher), settings)
    planned = per_gpu(s, t, settings, "ddp", 1)
    assert planned.peak == pytest.approx(tracker.peak, rel=0.01)


def test_a_tiny_plan_is_a_count_by_hand():
    config = tiny_config("llama", layers=2)  # hidden 64, MLP 128, 4/2 heads of 16, vocab 320, untied
    dims = Dims.of(config)
    layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64  # q, o; k, v; gate, up, down; two norms
    params = 2 * 320 * 64 + 2 * layer + 64
    assert (dims.params, dims.layer_params, dims.linear_params) == (params, layer, 2 * (layer - 128))
    cfg = DistillMemorySettings(gpus=1, batch_size=2, seq_len=32, grad_accum=1, precision="bf16-mixed", device="cuda")
    column = per_gpu(dims, dims, cfg, "ddp", 1)
    tokens, rows = 64, 62
    per_token_layer = 26 * 64 + 2 * (2 * 64 + 2 * 32) + 4 * 4 + 8 + 4 * 2 * 128  # bf16: see layer_activation_bytes
    # token ids (int64), RoPE's cos and sin (T x head_dim, fp32), the final norm's three (B, T, H) tensors
    activations = tokens * 8 + 2 * 4 * 32 * 16 + tokens * (12 * 64 + 4) + 2 * tokens * per_token_layer
    assert column.moment == "loss"
    assert column.parts == {
        "student weights": 4 * params, "gradients": 0, "AdamW state": 8 * params, "DDP gradient buckets": 0,
        "bf16 weight copies": 2 * dims.linear_params, "FSDP gathered weights": 0, "teacher weights": 2 * params,
        "activations": activations, "teacher inputs": rows * 64 * 2,
        "loss buffers": 4 * 320 * 64 + 2 * 4 * rows * 64,  # the head's fp32 gradient; hidden states' copy and gradient
        "logit slices": rows * ((2 + 20) * 320 + 4 * 320),  # one slice of all 62 rows
        "backward / optimizer temporaries": 0}
    assert column.peak == sum(column.parts.values())
    on_two = per_gpu(dims, dims, cfg, "ddp", 2)
    assert on_two.peak - column.peak == 4 * params  # DDP's gradient buckets


@pytest.mark.parametrize("teacher_config,shape", [(NEMO_12B, MN_MINITRON_8B), (LLAMA_31_8B, LLAMA_MINITRON_4B)])
def test_more_gpus_never_need_more_memory_per_gpu_under_fsdp(teacher_config, shape):
    teacher, student = Dims.of(teacher_config), Dims.of(teacher_config, shape)
    for accum in (1, 8):
        cfg = DistillMemorySettings(batch_size=2, seq_len=4096, grad_accum=accum, activation_checkpointing=True)
        for strategy in SETUPS:
            peaks = [per_gpu(student, teacher, cfg, strategy, n).peak for n in range(1, 65)]
            if strategy.startswith("fsdp"):
                assert all(a >= b for a, b in zip(peaks, peaks[1:])) and peaks[-1] < peaks[0], strategy
            else:  # DDP replicates: the same on every count past one (which has no gradient buckets)
                assert len(set(peaks[1:])) == 1 and peaks[1] > peaks[0]
    cfg = DistillMemorySettings(batch_size=1, seq_len=4096, grad_accum=1, activation_checkpointing=True, gpu_memory="80G")
    found = fewest_gpus(student, teacher, cfg, "fsdp")
    assert found is not None and per_gpu(student, teacher, cfg, "fsdp", found.gpus).peak <= 80 * 2**30
    assert found.gpus == 1 or per_gpu(student, teacher, cfg, "fsdp", found.gpus - 1).peak > 80 * 2**30


def test_the_teacher_cache_and_sharding_the_teacher_save_its_weights():
    teacher, student = Dims.of(NEMO_12B), Dims.of(NEMO_12B, MN_MINITRON_8B)
    cfg = DistillMemorySettings(batch_size=1, seq_len=4096, grad_accum=1, activation_checkpointing=True)
    on8 = {s: per_gpu(student, teacher, cfg, s, 8) for s in SETUPS}
    assert on8["fsdp"].parts["teacher weights"] == 2 * teacher.params  # bf16 on a GPU
    assert on8["fsdp-teacher"].parts["teacher weights"] < on8["fsdp"].parts["teacher weights"] / 3
    assert on8["fsdp-cache"].parts["teacher weights"] == 0
    assert on8["fsdp-cache"].peak < on8["fsdp-teacher"].peak < on8["fsdp"].peak < on8["ddp"].peak
    # --precision fp32 loads the teacher in fp32 on a GPU too (train.py: frozen_weights_dtype)
    fp32 = DistillMemorySettings(batch_size=1, seq_len=4096, grad_accum=1, activation_checkpointing=True,
                                 precision="fp32")
    assert per_gpu(student, teacher, fp32, "fsdp", 8).parts["teacher weights"] == 4 * teacher.params


def test_nothing_fits_says_so_and_what_would():
    teacher, student = Dims.of(LLAMA_31_8B), Dims.of(LLAMA_31_8B, LLAMA_MINITRON_4B)
    cfg = DistillMemorySettings(batch_size=4, seq_len=8192, grad_accum=36, gpu_memory="24G")
    plan = plan_memory(teacher, student, cfg)
    assert plan.smallest is None and all(c is None for c in plan.fewest.values())
    line = plan.advice
    assert "\n" not in line and line.startswith("nothing fits 24.0 GiB per GPU on up to 1024 GPUs")
    assert "activations" in line and "(batch 4 x 8192, grad-accum 36)" in line
    assert "What would: --batch-size 3 with activation checkpointing (" in line
    # what it proposes does fit, on the GPUs it names
    from dataclasses import replace

    fixed = plan_memory(teacher, student, replace(cfg, batch_size=3, activation_checkpointing=True))
    assert fixed.advice is None and fixed.smallest.peak <= 24 * 2**30
    assert f"({SETUPS[fixed.smallest.strategy]} on {fixed.smallest.gpus} GPUs" in line
    too_small = DistillMemorySettings(batch_size=4, seq_len=8192, grad_accum=1, gpu_memory="1G")
    assert advice(teacher, student, too_small).endswith("What would: GPUs with more memory (no smaller batch, activation "
                                                        "checkpointing or sequence down to 2048 tokens fits).")


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """The teachers as a user gives them offline: folders holding only config.json."""
    root = tmp_path_factory.mktemp("configs")
    NEMO_12B.save_pretrained(root / "nemo-12b")
    LLAMA_31_8B.save_pretrained(root / "llama-3.1-8b")
    return root


def test_plan_distill_from_a_recipe(configs, capsys):
    out, _ = run_cli(capsys, "plan", configs / "nemo-12b", "--distill", "--recipe", "mistral-nemo-12b-to-8b", "--json")
    plan = json.loads(out)
    s = plan["settings"]
    assert (s["batch_size"], s["seq_len"], s["grad_accum"], s["gpus"], s["precision"]) == (4, 8192, 24, 8, "bf16-mixed")
    assert {k: plan["student"][k] for k in ("hidden", "ffn", "heads", "kv_heads", "layers")} == MN_MINITRON_8B.to_dict()
    assert [c["strategy"] for c in plan["columns"]] == list(SETUPS)
    out, _ = run_cli(capsys, "plan", configs / "nemo-12b", "--distill", "--recipe", "mistral-nemo-12b-to-8b",
                     "--grad-accum", "1", "--batch-size", "1", "--activation-checkpointing", "--gpu-memory", "80G")
    assert "batch 1 x 8192, grad-accum 1" in out and "GiB per GPU on 8 GPUs" in out
    assert "smallest setup that fits 80 GiB per GPU:" in out and "FSDP" in out


def test_plan_distill_with_a_student_shape(configs, capsys):
    out, _ = run_cli(capsys, "plan", configs / "llama-3.1-8b", "--distill", "--student", "layers=16", "--batch-size", "4",
                     "--seq-len", "8192", "--gpus", "8", "--gpu-memory", "24G")
    assert "16 layers" in out and "nothing fits 24 GiB" not in out
    assert "nothing fits 24.0 GiB per GPU" in out and "What would:" in out
    out, _ = run_cli(capsys, "plan", configs / "llama-3.1-8b", "--distill", "--student", "hidden=3072,ffn=9216",
                     "--batch-size", "1", "--seq-len", "2048", "--json")
    plan = json.loads(out)
    assert plan["student"]["params"] == Dims.of(LLAMA_31_8B, LLAMA_MINITRON_4B).params
    # 16 bytes per student parameter (67 GiB) and the bf16 teacher (15 GiB) overflow one 80 GiB GPU; two shards fit
    assert plan["fewest_gpus"]["ddp"] is None and plan["fewest_gpus"]["ddp-cache"] is None
    assert plan["smallest"]["strategy"] == "fsdp" and plan["smallest"]["gpus"] == 2
