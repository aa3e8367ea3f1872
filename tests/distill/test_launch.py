"""What the distillation loop checks about the machine and the transformers it runs on before it trains."""

import pytest
import torch

from taille.errors import TailleError
from tests.conftest import tiny_config


@pytest.mark.parametrize("older", [False, True], ids=["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_activation_checkpointing_works_under_either_transformers_name(monkeypatch, older):
    """transformers before 5.2x has only gradient_checkpointing_enable (a GPU machine with 5.17 failed with an
    AttributeError on --activation-checkpointing): either name must turn the checkpoints on."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from taille.distill.train import checkpoint_activations

    if older:
        if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):
            pytest.skip("this transformers has only the older name: the other case is the one to run")
        # the older transformers: the implementation under the older name, the newer name absent
        monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable",
                            PreTrainedModel.activation_checkpointing_enable)
        monkeypatch.delattr(PreTrainedModel, "activation_checkpointing_enable")
    model = AutoModelForCausalLM.from_config(tiny_config("llama", layers=2)).train()
    on = lambda: any(getattr(layer, "gradient_checkpointing", False) for layer in model.model.layers)  # noqa: E731
    assert not on()
    checkpoint_activations(model)
    assert on()
    ids = torch.randint(3, 300, (2, 16))
    model(ids, labels=ids).loss.backward()  # the checkpointed layers run their backward
    assert all(p.grad is not None for p in model.model.layers[0].parameters())


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    """Two processes on a one-GPU machine: the second would be sent to cuda:1 and die in the first collective
    with CUDA's "invalid device ordinal" (seen on an H200 machine); it is refused by name instead."""
    from taille.distill import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    train.check_one_process_per_gpu()  # the first process has its GPU
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(TailleError, match="2 processes were launched on this machine and it has 1 GPU: .*--nproc-per-node 1"):
        train.check_one_process_per_gpu()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU: gloo on the CPUs, any count
    train.check_one_process_per_gpu()
