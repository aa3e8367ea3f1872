"""FSDP2 over gloo on the CPU, 2 processes: the same curve as 1 process, sharded checkpoints that survive a
SIGKILL and reshard onto another number of processes, and an ordinary Hugging Face folder at the end."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import kill_when_exists, run_cli
from tests.distill.test_train import args, make_setup, metrics

ENV = {**os.environ, "TAILLE_LOG": "WARNING", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def taille(*argv, processes: int = 1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(free_port())] if processes > 1 else [sys.executable]
    return launcher + ["-m", "taille", *map(str, argv)]


def run(cmd):
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(out):
    return [r["loss"] for r in metrics(out) if "loss" in r]


def logits(folder, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits


def test_fsdp_on_two_processes_matches_one_process_and_saves_a_plain_model(tmp_path):
    """Tied embeddings (one tensor in two modules), the teacher's layers sharded too, the hidden-state loss's
    projections in the root unit: 8 steps agree with 1 process within 1e-4."""
    teacher, student, data, held = make_setup(tmp_path, tied=True)
    common = {"--tokens": 1024, "--eval-every": 4, "--hidden-layers": "auto"}
    run(taille(*args(teacher, student, data, held, tmp_path / "one", **common)[0:]))
    run(taille(*args(teacher, student, data, held, tmp_path / "fsdp", **{**common, "--batch-size": 2}),
               "--strategy", "fsdp", "--shard-teacher", processes=2))
    one, fsdp = metrics(tmp_path / "one"), metrics(tmp_path / "fsdp")
    assert len(losses(tmp_path / "one")) == 8
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    assert [r["eval_kl"] for r in fsdp if "eval_kl" in r] == pytest.approx([r["eval_kl"] for r in one if "eval_kl" in r],
                                                                            abs=1e-4)
    record = json.loads((tmp_path / "fsdp" / "taille.json").read_text())["distill"]
    assert record["strategy"] == "fsdp" and record["processes"] == 2 and record["global_batch"] == 4
    # the folder is plain transformers, and holds exactly the weights of the last (gathered) checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 200, (2, 16))
    saved = logits(tmp_path / "fsdp", ids)
    from_checkpoint = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp").eval()
    weights = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step-0000008" / "student.safetensors"))
    missing, unexpected = from_checkpoint.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight", "model.embed_tokens.weight"}
    with torch.no_grad():
        assert torch.equal(saved, from_checkpoint(ids).logits)
    assert saved == pytest.approx(logits(tmp_path / "one", ids), abs=1e-4)


def test_a_killed_fsdp_run_resumes_from_its_shards_on_two_processes_or_one(tmp_path, capsys):
    """Tied embeddings: one tensor stored once in the shards, under one name, and put back under both."""
    setup = make_setup(tmp_path, tied=True)
    run(taille(*args(*setup, tmp_path / "one")))  # 32 steps, checkpoints every 8
    fsdp = lambda out, **extra: args(*setup, out, **{"--batch-size": 2, **extra}) + [  # noqa: E731
        "--strategy", "fsdp", "--sharded-checkpoints"]
    killed = tmp_path / "killed"
    kill_when_exists(taille(*fsdp(killed), processes=2), ENV, killed / "checkpoints" / "latest", 180)
    (checkpoint,) = [p for p in (killed / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert {"trunk.rank-00000-of-00002.safetensors", "trunk.rank-00001-of-00002.safetensors",
            "shards.json"} <= {p.name for p in checkpoint.iterdir()}
    assert not (killed / "taille.json").exists()  # it did not finish
    subprocess.run(["cp", "-r", str(killed), str(tmp_path / "copy")], check=True)

    run(taille(*fsdp(killed), "--resume", processes=2))
    reference = losses(tmp_path / "one")
    assert len(losses(killed)) == len(reference) == 32  # no step twice
    assert losses(killed)[-1] == pytest.approx(reference[-1], abs=1e-4)

    # the same shards on one process: reassembled, at the same global batch (1 x 4 blocks)
    copy = tmp_path / "copy"
    _, err = run_cli(capsys, *args(*setup, copy, **{"--batch-size": 2}), "--resume", code=2)
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert "global batch of 4 blocks" in line and "this run's is 2" in line
    run(taille(*args(*setup, copy), "--resume"))
    assert losses(copy)[-1] == pytest.approx(reference[-1], abs=1e-4)


@pytest.mark.parametrize("env,message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed, which taille's distillation loop does not run"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "set fsdp_version: 2"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "taille's --precision chooses"),
])
def test_a_strategy_the_loop_cannot_run_is_refused_at_start(tmp_path, capsys, monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _, err = run_cli(capsys, *args(*make_setup(tmp_path, tied=False), tmp_path / "o"), code=2)
    assert message in err and not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.parametrize("extra,message", [
    (["--strategy", "zero3"], "--strategy zero3: use one of auto, ddp, fsdp"),
    (["--strategy", "ddp", "--shard-teacher"], "need --strategy fsdp"),
    (["--strategy", "ddp", "--sharded-checkpoints"], "need --strategy fsdp"),
])
def test_bad_sharding_options_are_refused(tmp_path, capsys, extra, message):
    _, err = run_cli(capsys, *args(*make_setup(tmp_path, tied=False), tmp_path / "o"), *extra, code=2)
    assert message in err


def test_ddp_strategy_under_an_fsdp_accelerate_config_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    _, err = run_cli(capsys, *args(*make_setup(tmp_path, tied=False), tmp_path / "o"), "--strategy", "ddp", code=2)
    assert "--strategy ddp, but accelerate is configured for FSDP" in err


AGREE = """
import os, sys
from accelerate import Accelerator
from taille.distill.train import _same_on_every_process
from taille.errors import TailleError
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
seen = {"error": "error: no complete cache here" if rank == 1 else "{}", "differs": str(rank), "same": "{}"}[sys.argv[1]]
try:
    _same_on_every_process(accelerator, seen, "--teacher-cache C")
    said = "accepted"
except TailleError as e:
    said = f"refused: {e}"
open(os.path.join(sys.argv[2], f"rank{rank}.txt"), "w").write(f"rank {rank}: {said}")  # one pipe would interleave
accelerator.wait_for_everyone()
import torch.distributed
torch.distributed.destroy_process_group()  # a rank leaving a live gloo group can abort at exit
"""


@pytest.mark.parametrize("case,expected", [
    ("error", "refused: --teacher-cache C: process 1 cannot read it (no complete cache here)"),
    ("differs", "refused: --teacher-cache C: the processes read different caches"),
    ("same", "accepted"),
])
def test_a_cache_some_process_cannot_read_is_refused_on_every_process(tmp_path, case, expected):
    """Over a real 2-process gloo group: one process's view of the cache decides for all, before any step
    (a process that failed alone would leave the others waiting in the first collective)."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(script), case, str(tmp_path)])
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert len(lines) == 2 and all(line.startswith(f"rank {r}: {expected}") for r, line in enumerate(lines))


def test_activation_checkpointing_recomputes_the_layers_and_changes_no_number(tmp_path):
    """With --activation-checkpointing each student layer runs twice per step (forward, then again in
    backward) and the step's loss and gradient norm stay the same."""
    from taille.distill.train import DistillConfig, _layers, setup, train_step

    teacher, student, data, held = make_setup(tmp_path, tied=False)
    results = {}
    for recompute in (False, True):
        cfg = DistillConfig(student=str(student), teacher=str(teacher), data=str(data), eval_data=None,
                            out=str(tmp_path / f"o{recompute}"), tokens=256, seq_len=32, batch_size=4, precision="fp32",
                            progress=False, hidden_layers="auto", activation_checkpointing=recompute)
        state = setup(cfg)
        calls, mlp = [], _layers(state.student)[0].mlp
        forward = mlp.forward  # torch skips module hooks while it recomputes: count the calls themselves
        mlp.forward = lambda *a, forward=forward, calls=calls, **k: (calls.append(1), forward(*a, **k))[1]
        out = train_step(state, 0)
        results[recompute] = (len(calls), float(out["loss"]), float(out["grad_norm"]))
    assert results[False][0] == 1 and results[True][0] == 2
    assert results[True][1:] == pytest.approx(results[False][1:], rel=1e-6)


def test_on_policy_distillation_on_two_fsdp_processes_matches_one_process(tmp_path):
    """The student samples its tails inside the sharded forward (every process the same number of blocks and
    tokens, so the gathers stay in step), from the same blocks with the same draws as one process: the
    curve agrees within 1e-4; and it is not the off-policy curve."""
    teacher, student, data, held = make_setup(tmp_path, tied=True)
    common = {"--tokens": 512, "--eval-every": 4, "--on-policy": 0.5, "--on-policy-tokens": 8}
    run(taille(*args(teacher, student, data, held, tmp_path / "one", **common)))
    run(taille(*args(teacher, student, data, held, tmp_path / "fsdp", **{**common, "--batch-size": 2}),
               "--strategy", "fsdp", processes=2))
    run(taille(*args(teacher, student, data, held, tmp_path / "off", **{**common, "--on-policy": 0})))
    assert len(losses(tmp_path / "one")) == 4
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    # the student's tails changed what was graded: the off-policy curve is more than twice the tolerance away
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "off"), losses(tmp_path / "one"))) > 2e-4


def test_replies_only_loss_on_two_fsdp_processes_matches_one_process(tmp_path):
    """--loss-on replies on a mixture of chat data and plain text: every process counts the global batch's
    reply targets from the data alike (no collective), each shard's loss is its masked sum over that count,
    so the sharded curve is one process's within 1e-4; and it is not --loss-on all's."""
    from tests.distill.test_loss_on_replies import chat_file

    teacher, student, plain, held = make_setup(tmp_path, tied=True)
    data = f"{chat_file(tmp_path)}:0.7,{plain}:0.3"
    common = {"--tokens": 1024, "--eval-every": 4, "--loss-on": "replies"}
    run(taille(*args(teacher, student, data, held, tmp_path / "one", **common)))
    run(taille(*args(teacher, student, data, held, tmp_path / "fsdp", **{**common, "--batch-size": 2}),
               "--strategy", "fsdp", processes=2))
    run(taille(*args(teacher, student, data, held, tmp_path / "all", **{**common, "--loss-on": "all"})))
    assert len(losses(tmp_path / "one")) == 8
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "all"), losses(tmp_path / "one"))) > 2e-4
