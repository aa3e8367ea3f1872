"""Distillation checkpoints keep the training state without pickles: it comes back exactly, and a planted
pickle in a checkpoint folder is refused (or ignored), never run."""

import contextlib
import pickle
import random

import numpy as np
import pytest
import torch

from taille.distill.checkpoint import load_training_state, save_checkpoint
from taille.distill.train import DistillConfig
from taille.errors import TailleError
from tests.conftest import run_cli
from tests.distill.test_train import args, make_setup


class Planted:
    """Unpickling this runs code (it writes `marker`), as a malicious checkpoint file would."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def plant(path, marker, writer: str = "torch.save") -> None:
    if writer == "torch.save":
        torch.save(Planted(marker), path)
    else:
        path.write_bytes(pickle.dumps(Planted(marker), protocol=2))


def model_and_optimizer(seed: int):
    """Two parameter groups and betas as distill() builds them, a few steps in (every state tensor set)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95))
    for _ in range(3):
        model(torch.randn(5, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def draws() -> list:
    """The next values of every generator; gauss() and standard_normal() read the cached second normal."""
    return [random.random(), random.gauss(0, 1), np.random.random(), np.random.standard_normal(), torch.rand(4)]


def assert_same_state(loaded: dict, expected: dict) -> None:
    assert loaded["param_groups"] == expected["param_groups"]  # betas a tuple again, not a list
    assert loaded["state"].keys() == expected["state"].keys()
    for index, values in expected["state"].items():
        assert loaded["state"][index].keys() == values.keys()
        for name, tensor in values.items():
            assert loaded["state"][index][name].dtype == tensor.dtype
            assert torch.equal(loaded["state"][index][name], tensor), (index, name)


def assert_same_draws(got: list, expected: list) -> None:
    assert got[:4] == expected[:4]
    assert torch.equal(got[4], expected[4])


def scramble_rngs():
    random.seed(99), np.random.seed(99), torch.manual_seed(99)


def cfg():
    return DistillConfig(student="s", data="d", out="o", teacher="t")


def test_training_state_round_trips_exactly(tmp_path):
    model, optimizer = model_and_optimizer(seed=0)
    random.gauss(0, 1), np.random.standard_normal()  # leave a cached normal in both: part of the state
    folder = save_checkpoint(tmp_path, 3, model, optimizer, cfg(), {"tokens": 0})
    assert not list(folder.glob("*.pt"))
    expected_state, expected_draws = optimizer.state_dict(), draws()

    scramble_rngs()
    model2, fresh = model_and_optimizer(seed=1)
    model2.load_state_dict(model.state_dict())
    load_training_state(folder, fresh)
    assert_same_state(fresh.state_dict(), expected_state)
    assert_same_draws(draws(), expected_draws)
    # and the next step moves both the same way
    for m, opt in ((model, optimizer), (model2, fresh)):
        torch.manual_seed(5)
        m(torch.randn(5, 8)).square().mean().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def old_layout(folder, optimizer) -> None:
    """A checkpoint as taille wrote it before safetensors: torch.save pickles."""
    folder.mkdir()
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               folder / "rng.pt")


def test_an_older_checkpoint_loads_through_the_restricted_unpickler(tmp_path):
    _, optimizer = model_and_optimizer(seed=0)
    random.gauss(0, 1), np.random.standard_normal()
    old_layout(tmp_path / "old", optimizer)
    expected_state, expected_draws = optimizer.state_dict(), draws()

    scramble_rngs()
    _, fresh = model_and_optimizer(seed=1)
    load_training_state(tmp_path / "old", fresh)
    assert_same_state(fresh.state_dict(), expected_state)
    assert_same_draws(draws(), expected_draws)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_the_planted_file_runs_code_when_unpickled(tmp_path, writer):
    """What the tests below guard against: the plain loader runs the planted code."""
    plant(tmp_path / "optimizer.pt", tmp_path / "marker", writer)
    with pytest.raises(RuntimeError) if writer == "pickle" else contextlib.nullcontext():  # not a torch file:
        torch.load(tmp_path / "optimizer.pt", weights_only=False)
    assert (tmp_path / "marker").read_text() == "ran"


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
@pytest.mark.parametrize("planted", ["optimizer.pt", "rng.pt"])
def test_a_planted_pickle_in_an_older_checkpoint_is_refused(tmp_path, planted, writer):
    _, optimizer = model_and_optimizer(seed=0)
    old_layout(tmp_path / "old", optimizer)
    plant(tmp_path / "old" / planted, tmp_path / "marker", writer)
    with pytest.raises(TailleError, match="optimizer.pt|rng.pt") as error:
        load_training_state(tmp_path / "old", optimizer)
    message = str(error.value)
    assert planted in message and "cannot be loaded safely" in message and "without --resume" in message
    assert "\n" not in message
    assert not (tmp_path / "marker").exists()


# --- through `taille distill --resume` ---------------------------------------------------------------


@pytest.fixture
def finished_run(tmp_path, capsys):
    """A finished tiny run (its last checkpoint is the end) and the command line that resumes it."""
    command = args(*make_setup(tmp_path, tied=False), tmp_path / "run", **{"--tokens": 1024}) + ["--resume"]
    run_cli(capsys, *command[:-1])
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000008"
    assert (checkpoint / "optimizer.safetensors").is_file()
    return command, checkpoint


def test_resume_refuses_a_planted_pickle_in_an_older_checkpoint(finished_run, tmp_path, capsys):
    command, checkpoint = finished_run
    for name in ("optimizer.safetensors", "optimizer.json", "rng.safetensors", "rng.json"):
        (checkpoint / name).unlink()
    plant(checkpoint / "optimizer.pt", tmp_path / "marker")
    plant(checkpoint / "rng.pt", tmp_path / "marker")
    _, err = run_cli(capsys, *command, code=2)
    assert "optimizer.pt is an older checkpoint file that cannot be loaded safely" in err
    assert not (tmp_path / "marker").exists()


def test_resume_ignores_a_pickle_beside_the_safetensors(finished_run, tmp_path, capsys):
    command, checkpoint = finished_run
    plant(checkpoint / "optimizer.pt", tmp_path / "marker")
    plant(checkpoint / "rng.pt", tmp_path / "marker")
    run_cli(capsys, *command)
    assert not (tmp_path / "marker").exists()
