"""Run by test_fsdp.py: a 2-process CPU FSDP2 fit (``ModelParallelStrategy``, gloo) with or without SaliencyMonitor.

The backbone is ResNet-like: a stem, two stages, a pool. Each stage and the LightningModule itself (the root) are
``fully_shard``-ed in ``configure_model``, so the stem's and the heads' parameters belong to the root's FSDP group:
calling ``pl_module.backbone(images)`` alone never gathers them.

Each rank writes ``rank<r>.json`` (what it logged, the step reached or the error that stopped it, the monitor's
warnings, the collectives issued inside each training batch) and ``rank<r>.pt`` (the full, gathered state dict
after training).

Usage: ``fsdp_script.py OUT [--monitor none|strict|lenient] [--fail-on-rank R [--fail forward|forward-start|log]]
[--layer NAME|auto] [--mixed-precision]``.
"""

import argparse
import json
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_helpers import TinySimSiam, loader
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from tsm_lightning import SaliencyMonitor


def staged_cnn(width: int = 8, norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Sequential:
    """Stem (0-2), stage1 (3), stage2 (4, 8x8 at 16 px), pool (5), flatten (6)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        norm(width),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(width, width, 3, padding=1), norm(width), nn.ReLU()),
        nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), norm(2 * width), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(1, channels)


class ShardedSimSiam(TinySimSiam):
    """TinySimSiam with the staged backbone, its stages and the module itself ``fully_shard``-ed.

    With ``mixed_precision``, every group gathers its parameters in bfloat16 (``MixedPrecisionPolicy``); the norms
    are GroupNorm and the projection head has none, since CPU BatchNorm cannot mix bfloat16 weights with float32
    running statistics.
    """

    def __init__(self, mixed_precision: bool = False) -> None:
        super().__init__()
        self.mixed_precision = mixed_precision
        self.backbone = staged_cnn(norm=_group_norm if mixed_precision else nn.BatchNorm2d)
        if mixed_precision:
            self.projection_head[1] = nn.Identity()

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if self.mixed_precision else MixedPrecisionPolicy()
        for stage in (self.backbone[3], self.backbone[4]):
            fully_shard(stage, mesh=mesh, mp_policy=policy)
        fully_shard(self, mesh=mesh, mp_policy=policy)


class FailOnRank:
    """A ``forward_fn`` that fails on one rank only.

    ``where="middle"``: inside the model's forward, in stage 2 after FSDP's pre-forward ran (FSDP's state is left
    "in forward"); ``where="start"``: before the model runs (the other ranks' forward would meet no peer in any
    collective it issued).
    """

    def __init__(self, rank: int, where: str) -> None:
        self.rank, self.where = rank, where

    def __call__(self, module: nn.Module, images: torch.Tensor) -> object:
        def fail(*_: object) -> None:
            raise RuntimeError(f"injected failure on rank {self.rank}")

        failing = module.global_rank == self.rank
        if failing and self.where == "start":
            fail()
        handle = module.backbone[4].register_forward_pre_hook(fail) if failing else None
        try:
            return module.backbone(images)
        finally:
            if handle is not None:
                handle.remove()


class FailingSink:
    """A sink (written on rank zero only, by the monitor's background writer) that fails on that rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def write(self, pictures: object, scalars: object, step: int) -> None:
        if int(os.environ.get("RANK", "0")) == self.rank:
            raise OSError(f"injected logging failure on rank {self.rank}")


COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "all_gather_object",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "all_reduce",
    "broadcast",
    "broadcast_object_list",
    "barrier",
)


class CollectiveCounter(Callback):
    """Counts the torch.distributed collectives issued inside each training batch (listed before the monitor, so
    its ``on_train_batch_end`` runs before the monitor's)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.per_batch: list[list[str]] = []
        for name in COLLECTIVES:
            original = getattr(dist, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.calls.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.per_batch.append(list(self.calls))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--monitor", choices=("none", "strict", "lenient"), default="strict")
    parser.add_argument("--fail-on-rank", type=int, default=None, help="inject a failure on this rank")
    parser.add_argument("--fail", choices=("forward", "forward-start", "log"), default="forward", help="where")
    parser.add_argument("--layer", default="backbone.4", help="'auto' for layer=None (discovery on every rank)")
    parser.add_argument("--mixed-precision", action="store_true", help="bfloat16 parameters in forward (FSDP2 policy)")
    args = parser.parse_args()

    seed_everything(0)
    counter = CollectiveCounter()
    callbacks: list[Callback] = [counter]
    monitor = None
    if args.monitor != "none":
        fail_forward = args.fail_on_rank is not None and args.fail.startswith("forward")
        forward_fn = FailOnRank(args.fail_on_rank, "start" if args.fail == "forward-start" else "middle")
        forward_fn = forward_fn if fail_forward else None
        monitor = SaliencyMonitor(
            torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)),  # leaves the global RNG alone
            layer=None if args.layer == "auto" else args.layer,
            every_n_steps=2,
            num_images=4,
            forward_fn=forward_fn,
            strict=args.monitor == "strict",
            sinks=[FailingSink(args.fail_on_rank)] if args.fail_on_rank is not None and args.fail == "log" else None,
        )
        callbacks.append(monitor)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=timedelta(seconds=60)),
        max_steps=4,
        callbacks=callbacks,
        logger=TensorBoardLogger(args.out, name="tb", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    model = ShardedSimSiam(mixed_precision=args.mixed_precision)
    report: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(model, loader())
        except Exception as err:
            report["error"] = f"{type(err).__name__}: {err}"
    rank = trainer.global_rank
    report.update(
        step=trainer.global_step,
        logged_steps=monitor.logged_steps if monitor is not None else None,
        layer=monitor.layer if monitor is not None else None,
        warnings=[str(w.message) for w in caught if "SaliencyMonitor" in str(w.message)],
        collectives_per_batch=counter.per_batch,
    )
    if "error" not in report:
        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        state = get_model_state_dict(model, options=options)
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, args.out / f"rank{rank}.pt")
    (args.out / f"rank{rank}.json").write_text(json.dumps(report))
    sys.exit(1 if "error" in report else 0)


if __name__ == "__main__":
    main()
