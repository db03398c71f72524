"""In-process checks of tsm_lightning.callbacks.sharding (the 2-process FSDP2 runs are in test_fsdp.py)."""

from types import SimpleNamespace

import torch
from lightning_helpers import TinySimSiam
from torch import nn

from tsm_lightning.callbacks.sharding import _is_above, agree_on_failure, detect_sharding


class Wrapper(nn.Module):
    """Stands for a strategy's wrapper (DDP, an engine) around the LightningModule."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_unsharded_models_are_not_detected():
    model = TinySimSiam()
    assert detect_sharding(None, model) is None
    trainer = SimpleNamespace(strategy=SimpleNamespace(model=Wrapper(model)))
    assert detect_sharding(trainer, model) is None
    assert not torch.distributed.is_initialized()


def test_agreement_without_a_process_group_is_local():
    assert agree_on_failure(None) == {}
    assert agree_on_failure(ValueError("bad probe")) == {0: "ValueError: bad probe"}


def test_module_names_above():
    assert _is_above("", "backbone")
    assert _is_above("backbone", "backbone.4.0")
    assert not _is_above("backbone", "backbone")
    assert not _is_above("backbone.4", "backbone.40")
    assert not _is_above("backbone.4.0", "backbone")
