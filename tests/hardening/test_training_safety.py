"""The monitor never hurts a training run: precision, layouts, compilation, workers, failures, memory."""

import warnings

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback
from lightning_helpers import TinySimSiam, loader, trainer_kwargs

from tsm_lightning import METHODS, MetricOptions, SaliencyMonitor
from tsm_lightning.callbacks.monitor import SaliencyMonitorMixin

LAYER = "backbone.5"


class Snapshot(Callback):
    """Records the model's modes, hooks, requires_grad, grads and BatchNorm stats around every monitor run."""

    def __init__(self, monitor):
        self.monitor = monitor
        self.checked = 0
        original = monitor.run

        def wrapped(trainer, pl_module):
            module = pl_module
            before = self._state(module)
            original(trainer, pl_module)
            after = self._state(module)
            assert before.keys() == after.keys()
            for key in before:
                a, b = before[key], after[key]
                assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
            self.checked += 1

        monitor.run = wrapped

    @staticmethod
    def _state(module):
        state = {f"mode:{n}": m.training for n, m in module.named_modules()}
        state.update({f"hooks:{n}": len(m._forward_hooks) for n, m in module.named_modules()})
        for n, p in module.named_parameters():
            state[f"rg:{n}"] = p.requires_grad
            state[f"grad:{n}"] = None if p.grad is None else p.grad.clone()
        state.update({f"buf:{k}": v.clone() for k, v in module.state_dict().items()})
        return state


def _fit(tmp_path, monitor, seed=0, num_workers=0, **overrides):
    seed_everything(seed, workers=True)
    model = TinySimSiam()
    callbacks = [monitor] if monitor is not None else []
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(model, loader(num_workers=num_workers))
    return trainer, model


def test_bit_identical_with_augmenting_workers_and_every_metric(tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        _, plain = _fit(tmp_path / "a", None, num_workers=2, max_steps=8)
        monitor = SaliencyMonitor(
            layer=LAYER, every_n_steps=2, num_images=4, metrics=MetricOptions(faithfulness_every_n_runs=1)
        )
        _, watched = _fit(tmp_path / "b", monitor, num_workers=2, max_steps=8, logger=False)
    finally:
        torch.use_deterministic_algorithms(False)
    assert monitor.logged_steps == [0, 2, 4, 6, 8]
    assert plain.losses == watched.losses
    for key, value in plain.state_dict().items():
        assert torch.equal(value, watched.state_dict()[key]), key


def test_no_leaks_after_each_run_and_bounded_memory(tmp_path):
    monitor = SaliencyMonitor(torch.randn(3, 3, 16, 16), layer=LAYER, every_n_steps=1, num_images=3)
    snapshot = Snapshot(monitor)
    _fit(tmp_path, monitor, max_steps=10, logger=False)
    assert snapshot.checked == 11
    # Only the first and the previous maps are kept, whatever the number of runs.
    assert set(monitor.state_dict()) >= {"first_maps", "previous_maps"}
    assert all(m.shape == (3, 8, 8) for m in monitor.tracker.previous_maps.values())
    kept = [
        v
        for v in vars(monitor.tracker).values()
        if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values())
    ]
    assert len(kept) == 2


def test_bf16_mixed_precision_gives_finite_maps(tmp_path):
    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer=LAYER, every_n_steps=2, num_images=2, strict=True)
    maps_seen = []
    original = monitor.tracker.maps

    def spy(features, *args, **kwargs):
        decomposition, maps = original(features, *args, **kwargs)  # the maps and the decomposition they come from
        maps_seen.append((features.dtype, maps))
        return decomposition, maps

    monitor.tracker.maps = spy  # type: ignore[method-assign]
    _fit(tmp_path, monitor, max_steps=4, precision="bf16-mixed", logger=False)
    assert len(maps_seen) == 1 + 3  # the fresh-initialisation reference, then the runs at steps 0, 2, 4
    for dtype, maps in maps_seen:
        assert dtype == torch.float32
        assert all(torch.isfinite(m).all() for m in maps.values())


def test_channels_last_model(tmp_path):
    class ChannelsLast(TinySimSiam):
        def on_fit_start(self):
            self.to(memory_format=torch.channels_last)

    seed_everything(0)
    monitor = SaliencyMonitor(
        torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last), layer=LAYER, every_n_steps=2, num_images=2,
        strict=True,
    )  # fmt: skip
    Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_steps=2, logger=False)).fit(ChannelsLast(), loader())
    assert monitor.logged_steps == [0, 2]
    assert all(torch.isfinite(m).all() for m in monitor.tracker.previous_maps.values())


def test_compiled_backbone_is_captured(tmp_path):
    class Compiled(TinySimSiam):
        def __init__(self):
            super().__init__()
            self.backbone = torch.compile(self.backbone)

    seed_everything(0)
    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer=LAYER, every_n_steps=2, num_images=2, strict=True,
                              methods=["tsm"])  # fmt: skip
    Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_steps=2, logger=False)).fit(Compiled(), loader())
    assert monitor.logged_steps == [0, 2]
    assert monitor.tracker.previous_maps["tsm"].shape == (2, 8, 8)


def test_failing_forward_fn_warns_restores_state_and_training_goes_on(tmp_path):
    def broken(module, images):
        module.backbone(images)  # the hook fires, then user code fails
        raise KeyError("user forward failed")

    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer=LAYER, every_n_steps=2, num_images=2, forward_fn=broken)
    with pytest.warns(RuntimeWarning, match="KeyError: 'user forward failed'"):
        trainer, model = _fit(tmp_path, monitor, max_steps=4, logger=False)
    assert trainer.global_step == 4 and len(model.losses) == 4
    assert monitor.logged_steps == []
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training and all(m.training for m in model.modules())


def test_unwritable_output_warns_and_training_goes_on(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tsm_lightning.sinks.save_png", full_disk)
    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer=LAYER, every_n_steps=2, num_images=2)
    with pytest.warns(RuntimeWarning, match=r"writing the run of step 0 failed: OSError.*No space left on device"):
        trainer, _ = _fit(tmp_path, monitor, max_steps=4, logger=False)
    assert trainer.global_step == 4 and monitor.logged_steps == [0, 2, 4]  # computing went on; writing failed
    strict = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer=LAYER, every_n_steps=2, num_images=2, strict=True)
    with pytest.raises(RuntimeError, match=r"writing the run of step 0 failed: OSError.*No space left"):
        _fit(tmp_path / "strict", strict, max_steps=4, logger=False)


def test_mixin_is_the_single_implementation():
    # Both Trainer flavours share one implementation: nothing to drift apart.
    from tsm_lightning.callbacks.pl import SaliencyMonitor as PLSaliencyMonitor

    assert issubclass(SaliencyMonitor, SaliencyMonitorMixin) and issubclass(PLSaliencyMonitor, SaliencyMonitorMixin)
    assert set(METHODS) == set(SaliencyMonitor().methods)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PLSaliencyMonitor(layer="backbone.7")
