"""The background writer: order, a bounded queue, errors reported later, nothing left behind."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from lightning.pytorch import Trainer

from tests.lightning_helpers import TinySimSiam, loader, trainer_kwargs
from tsm_lightning import SaliencyMonitor
from tsm_lightning.sinks import BackgroundWriter

PICTURE = {"saliency/tsm": torch.zeros(3, 4, 4, dtype=torch.uint8)}


class SlowSink:
    """Records (step, thread name) and blocks each write until released."""

    def __init__(self) -> None:
        self.written: list[tuple[int, str]] = []
        self.release = threading.Semaphore(0)

    def write(self, pictures, scalars, step):
        self.release.acquire()
        self.written.append((step, threading.current_thread().name))


class FailingSink:
    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.steps: list[int] = []

    def write(self, pictures, scalars, step):
        if step == self.fail_at:
            raise OSError("disk full")
        self.steps.append(step)


def test_writes_in_order_off_the_calling_thread_and_blocks_when_full():
    sink = SlowSink()
    writer = BackgroundWriter([sink], max_pending=2)
    writer.submit(PICTURE, {}, 0)  # taken by the thread, which waits inside write
    time.sleep(0.05)
    writer.submit(PICTURE, {}, 1)
    writer.submit(PICTURE, {}, 2)  # the queue now holds 2: the next submit must wait for a write
    blocked = threading.Thread(target=writer.submit, args=(PICTURE, {}, 3))
    blocked.start()
    blocked.join(timeout=0.2)
    assert blocked.is_alive()  # bounded: the caller waits instead of queueing more
    for _ in range(4):
        sink.release.release()
    blocked.join(timeout=5)
    assert not blocked.is_alive()
    writer.close()
    assert [step for step, _ in sink.written] == [0, 1, 2, 3]
    assert {name for _, name in sink.written} == {"tsm-lightning-writer"}
    assert threading.current_thread().name not in {name for _, name in sink.written}


def test_an_error_is_raised_at_the_next_call_and_later_writes_go_on():
    sink = FailingSink(fail_at=1)
    writer = BackgroundWriter([sink])
    writer.submit(PICTURE, {"a": 1.0}, 0)
    writer.submit(PICTURE, {"a": 1.0}, 1)
    writer.submit(PICTURE, {"a": 1.0}, 2)
    with pytest.raises(RuntimeError, match="writing the run of step 1 failed: OSError: disk full"):
        writer.flush()
    writer.flush()  # reported once
    writer.close()
    assert sink.steps == [0, 2]


def test_close_writes_everything_and_leaves_no_thread():
    sink = FailingSink(fail_at=-1)
    writer = BackgroundWriter([sink], max_pending=1)
    for step in range(5):
        writer.submit(PICTURE, {}, step)
    writer.close()
    assert sink.steps == [0, 1, 2, 3, 4]
    assert not any(t.name == "tsm-lightning-writer" for t in threading.enumerate())


@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_max_pending_is_checked(value):
    with pytest.raises(ValueError, match="max_pending"):
        BackgroundWriter([], max_pending=value)


def test_monitor_flushes_at_fit_end_and_leaves_no_thread(tmp_path):
    sink = FailingSink(fail_at=-1)
    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer="backbone.5", every_n_steps=2, sinks=[sink], strict=True)

    Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, logger=False, max_steps=4)).fit(TinySimSiam(), loader())
    assert sink.steps == [0, 2, 4]  # every run written by the time fit returns
    assert not any(t.name == "tsm-lightning-writer" for t in threading.enumerate())
    assert not list((tmp_path / "saliency").glob("*.png"))  # a user's sink instead of the PNG fallback


def test_monitor_writes_what_it_computed_when_training_fails(tmp_path):
    class Crash(TinySimSiam):
        def training_step(self, batch, batch_idx):
            if self.global_step == 3:
                raise ValueError("training failed")
            return super().training_step(batch, batch_idx)

    sink = FailingSink(fail_at=-1)
    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer="backbone.5", every_n_steps=2, sinks=[sink], strict=True)

    with pytest.raises(ValueError, match="training failed"):
        Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, logger=False, max_steps=6)).fit(Crash(), loader())
    assert sink.steps == [0, 2]
    assert not any(t.name == "tsm-lightning-writer" for t in threading.enumerate())
