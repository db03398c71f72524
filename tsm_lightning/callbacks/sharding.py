"""Sharded training for :class:`~tsm_lightning.callbacks.SaliencyMonitor`: detection, gathering, agreement.

Under sharded strategies each rank holds only a shard of the parameters, and gathering them is a collective that
every rank must join, in the same order. A probe forward on rank zero alone would either fail (the shards are
``DTensor`` s that plain tensors cannot meet) or hang (rank zero waits for an all-gather the others never issue).
So under sharding every rank runs the monitor's probe forward, inside :meth:`Sharding.gathered`, and the ranks
agree on failures with :meth:`Sharding.agree` before anyone goes on; rank zero alone computes maps and logs.

What :meth:`Sharding.gathered` does, per strategy:

* **FSDP2** (``fully_shard``; Lightning's ``ModelParallelStrategy``): before the forward, the ``fully_shard`` -ed
  modules above the called module (their forward does not run, e.g. a ``fully_shard`` -ed LightningModule whose
  group holds the stem) and inside it are gathered with ``FSDPModule.unshard()``, so the forward itself issues no
  collective (unless a ``forward_fn`` also runs other sharded modules) and a failure in it on one rank cannot leave
  another blocked; afterwards every module that was
  sharded before is ``reshard()`` -ed. The inputs are cast as the skipped pre-forward above would cast them
  (``MixedPrecisionPolicy.param_dtype``). FSDP's per-iteration bookkeeping that a forward appends to (the
  post-forward order used for backward prefetching) is restored, so the next training step issues exactly the
  collectives it would have issued without the monitor. The FSDP roots are lazily initialised first, as the first
  training forward would do, so that a probe forward before the first training step does not make a nested
  module the root.
* **FSDP1** (``FSDPStrategy``): the ``FullyShardedDataParallel`` instances above the called module are gathered
  with ``summon_full_params(recurse=False, writeback=False)``; nested instances gather themselves in their forward
  (a forward must not start inside its own ``summon_full_params``).
* **DeepSpeed ZeRO stage 3** and tensor-parallel ``DTensor`` parameters: the strategy's own module hooks gather
  during the forward; nothing else is needed.

With FSDP1 and ZeRO-3 the forward itself issues collectives, so a failure half-way through it on one rank only can
leave the other ranks waiting in one of them until the process group's timeout; the agreement covers failures
before and after the forward, and under FSDP2 also those inside it.

Only FSDP2 is tested (2 CPU processes, gloo); FSDP1 and DeepSpeed need GPUs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SHARDING_KINDS", "Sharding", "agree_on_failure", "describe_failures", "detect_sharding", "skip_or_raise"]

SHARDING_KINDS = ("fsdp2", "fsdp1", "deepspeed", "dtensor")
"""What :func:`detect_sharding` can return, in the order it checks."""


@dataclass(frozen=True)
class Sharding:
    """A sharded training run, as seen by the monitor.

    Attributes:
        kind: one of :data:`SHARDING_KINDS`.
        top: the outermost module of the run: the strategy's wrapper (the FSDP1 root, the DeepSpeed engine) when it
            holds the LightningModule, else the LightningModule itself.
        device: where the agreement's flag tensor lives (the rank's own device: NCCL needs CUDA tensors).
    """

    kind: str
    top: nn.Module
    device: torch.device

    @contextlib.contextmanager
    def gathered(self, target: nn.Module) -> Iterator[None]:
        """Make the full parameters available for a forward that calls ``target``, on every rank.

        Every rank must enter this context with the same ``target``, in the same order of monitor runs.

        Args:
            target: the module the forward calls, e.g. ``pl_module.backbone``.
        """
        if self.kind == "fsdp2":
            with _fsdp2_gathered(self.top, target):
                yield
        elif self.kind == "fsdp1":
            with _fsdp1_gathered(self.top, target):
                yield
        else:  # DeepSpeed ZeRO-3 and tensor parallelism gather in their own module hooks
            yield

    def agree(self, error: BaseException | None) -> dict[int, str]:
        """Tell every rank which ranks failed; see :func:`agree_on_failure`."""
        return agree_on_failure(error, self.device)


def detect_sharding(trainer: Any, pl_module: nn.Module) -> Sharding | None:
    """Whether the parameters of ``pl_module`` are sharded across ranks, and how.

    Looks at the modules and parameters themselves (not at the strategy's class), so a ``fully_shard`` applied in
    ``configure_model`` is found whatever the strategy, and DDP or a single device give ``None``.

    Args:
        trainer: the ``Trainer`` (its ``strategy.model`` is the wrapper around ``pl_module``, if any), or ``None``.
        pl_module: the LightningModule.

    Returns:
        A :class:`Sharding`, or ``None`` when every rank holds the full parameters (single device, DDP, DeepSpeed
        stages 1 and 2).
    """
    strategy = getattr(trainer, "strategy", None)
    wrapper = getattr(strategy, "model", None)
    top = wrapper if isinstance(wrapper, nn.Module) and _contains(wrapper, pl_module) else pl_module
    device = _device_of(pl_module)
    fsdp2 = _fsdp2_class()
    if fsdp2 is not None and any(isinstance(m, fsdp2) for m in top.modules()):
        return Sharding("fsdp2", top, device)
    fsdp1 = _fsdp1_class()
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in top.modules()):
        return Sharding("fsdp1", top, device)
    if getattr(strategy, "zero_stage_3", False) is True or any(hasattr(p, "ds_id") for p in top.parameters()):
        return Sharding("deepspeed", top, device)
    dtensor = _dtensor_class()
    if dtensor is not None and any(isinstance(t, dtensor) for t in (*top.parameters(), *top.buffers())):
        return Sharding("dtensor", top, device)
    return None


def agree_on_failure(error: BaseException | None, device: torch.device | str = "cpu") -> dict[int, str]:
    """Collective: every rank learns which ranks failed, and why; call it on every rank.

    One ``all_reduce`` of a flag per rank; only when some rank failed, one ``all_gather_object`` of the error
    messages. Without an initialised process group (or with one process) nothing is communicated.

    Args:
        error: this rank's exception, or ``None`` if it succeeded.
        device: device of the flag tensor (CUDA for NCCL).

    Returns:
        ``{rank: "ExceptionType: message"}`` for every rank that failed; empty when all succeeded.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return {rank: _describe(error)} if error is not None else {}
    rank, world = dist.get_rank(), dist.get_world_size()
    flags = torch.zeros(world, dtype=torch.int32, device=device)
    flags[rank] = int(error is not None)
    dist.all_reduce(flags)
    failed = [r for r, flag in enumerate(flags.tolist()) if flag]
    if not failed:
        return {}
    messages: list[str | None] = [None] * world
    dist.all_gather_object(messages, _describe(error) if error is not None else None)
    return {r: messages[r] or "unknown error" for r in failed}


def describe_failures(failures: dict[int, str]) -> str:
    """``"ranks 0, 1 (rank 0: ...; rank 1: ...)"``: which ranks failed, and why."""
    ranks = sorted(failures)
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} ({_reasons(failures)})"


def _reasons(failures: dict[int, str]) -> str:
    return "; ".join(f"rank {rank}: {message}" for rank, message in sorted(failures.items()))


def skip_or_raise(step: int, failures: dict[int, str], error: Exception | None, *, strict: bool) -> None:
    """After the ranks agreed that a monitor run failed: raise, or warn that every rank skips the step.

    With ``strict`` this rank's own error is raised if it has one, else a ``RuntimeError`` naming the failed ranks.
    """
    if strict:
        if error is not None:
            raise error
        raise RuntimeError(
            f"SaliencyMonitor failed at step {step} on {describe_failures(failures)}; stopping every rank because "
            "strict=True."
        )
    warnings.warn(
        f"SaliencyMonitor skipped step {step} on every rank ({_reasons(failures)}). Training continues; pass "
        "strict=True to stop on such errors.",
        RuntimeWarning,
        stacklevel=4,
    )


# ---------------------------------------------------------------------------------------------------- FSDP2
@contextlib.contextmanager
def _fsdp2_gathered(top: nn.Module, target: nn.Module) -> Iterator[None]:
    fsdp2 = _fsdp2_class()
    assert fsdp2 is not None
    named = [(name, m) for name, m in top.named_modules() if isinstance(m, fsdp2)]
    roots = [m for name, m in named if not any(_is_above(other, name) for other, _ in named)]
    # Roots first, as the first training forward would: otherwise a nested module run first would become a root.
    for root in roots:
        _fsdp2_state(root)._lazy_init()
    target_name = _name_of(top, target)
    groups = [(module, _param_groups(_fsdp2_state(module))) for _, module in named]
    sharded_before = [all(g.is_sharded for g in module_groups) for _, module_groups in groups]
    # What a forward appends to and only a backward clears: kept as it was, so backward prefetching is unchanged.
    orders = {id(g.comm_ctx): g.comm_ctx.post_forward_order for _, gs in groups for g in gs}
    order_lengths = {key: len(order) for key, order in orders.items()}
    indices = [(g._post_forward_indices, len(g._post_forward_indices)) for _, gs in groups for g in gs]
    handle = None
    try:
        for name, module in named:
            if name == target_name or _is_above(name, target_name) or _is_above(target_name, name):
                module.unshard()
        above = [module for name, module in named if _is_above(name, target_name)]
        if above and not isinstance(target, fsdp2):
            handle = _cast_inputs_like(above[-1], target)
        yield
    except BaseException:
        # A forward that stopped half-way leaves FSDP's per-iteration state behind (modules still "in forward").
        for root in roots:
            if callable(getattr(root, "reset_iter_state", None)):  # public API of recent torch versions only
                root.reset_iter_state()
        raise
    finally:
        if handle is not None:
            handle.remove()
        for (module, module_groups), was_sharded in zip(groups, sharded_before, strict=True):
            if was_sharded and not all(g.is_sharded for g in module_groups):
                module.reshard()
        for key, order in orders.items():
            del order[order_lengths[key] :]
        for index_list, length in indices:
            del index_list[length:]


def _cast_inputs_like(owner: nn.Module, target: nn.Module) -> Any:
    """Cast ``target``'s floating-point inputs as the skipped pre-forward of ``owner`` would.

    ``owner`` is the innermost ``fully_shard`` -ed module above ``target``; its forward does not run, so neither
    does its cast to ``MixedPrecisionPolicy.param_dtype``, the dtype of its gathered parameters. Returns the hook
    handle, or ``None`` when there is nothing to cast.
    """
    policy = getattr(_fsdp2_state(owner), "_mp_policy", None)
    dtype = getattr(policy, "param_dtype", None)
    if dtype is None or not getattr(policy, "cast_forward_inputs", True):
        return None

    def cast(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _cast_floats(args, dtype), _cast_floats(kwargs, dtype)

    return target.register_forward_pre_hook(cast, prepend=True, with_kwargs=True)


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floats(item, dtype) for item in obj)
    if isinstance(obj, dict):
        return {key: _cast_floats(value, dtype) for key, value in obj.items()}
    return obj


def _fsdp2_state(module: nn.Module) -> Any:
    get_state = getattr(module, "_get_fsdp_state", None)
    state = get_state() if callable(get_state) else None
    if state is None or not callable(getattr(state, "_lazy_init", None)):
        raise RuntimeError(
            f"SaliencyMonitor cannot reach the FSDP2 state of {type(module).__name__} with torch {torch.__version__} "
            "(FSDPModule._get_fsdp_state()._lazy_init); please report this with your torch version."
        )
    return state


def _param_groups(state: Any) -> list[Any]:
    groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.10: one group per mesh
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return list(groups)


# ---------------------------------------------------------------------------------------------------- FSDP1
@contextlib.contextmanager
def _fsdp1_gathered(top: nn.Module, target: nn.Module) -> Iterator[None]:
    fsdp1 = _fsdp1_class()
    assert fsdp1 is not None
    target_name = _name_of(top, target)
    # Only the instances above the called module: a forward must not start inside its own summon_full_params.
    above = [m for name, m in top.named_modules() if isinstance(m, fsdp1) and _is_above(name, target_name)]
    with contextlib.ExitStack() as stack:
        for module in above:
            stack.enter_context(fsdp1.summon_full_params(module, recurse=False, writeback=False))
        yield


# ---------------------------------------------------------------------------------------------------- helpers
def _is_above(ancestor: str, name: str) -> bool:
    """Whether module ``ancestor`` strictly contains module ``name`` (dotted names from the same root)."""
    if ancestor == name:
        return False
    return ancestor == "" or name.startswith(ancestor + ".")


def _name_of(top: nn.Module, target: nn.Module) -> str:
    for name, module in top.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a sub-module of {type(top).__name__}.")


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _device_of(module: nn.Module) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _describe(error: BaseException | None) -> str:
    return f"{type(error).__name__}: {error}" if error is not None else ""


def _fsdp2_class() -> Any:
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule  # torch 2.4, 2.5
        except ImportError:
            return None
    return FSDPModule


def _fsdp1_class() -> Any:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return FullyShardedDataParallel


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor  # torch >= 2.5
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor  # torch 2.4
        except ImportError:
            return None
    return DTensor
