"""SaliencyMonitor under FSDP2 (``ModelParallelStrategy``, ``fully_shard``): 2 CPU processes (gloo), as subprocesses.

``fsdp_script.py`` is the reproduction of issue 16: before the fix the strict run crashed at the step-0 monitor run
(``aten.convolution.default: got mixed torch.Tensor and DTensor``) and the lenient one logged nothing.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SCRIPT = Path(__file__).with_name("fsdp_script.py")
TIMEOUT_S = 240  # a run takes about 10 s; a hang is killed here (and gloo gives up after 60 s)


def _run(out: Path, *args: str) -> tuple[int, str, dict[int, dict]]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    # Own session: on a hang, rank 1 (launched by rank 0) is killed with it.
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"fsdp_script.py {' '.join(args)} hung for {TIMEOUT_S} s")
    reports = {}
    for rank in (0, 1):
        path = out / f"rank{rank}.json"
        if not path.exists():
            pytest.fail(f"rank {rank} of fsdp_script.py {' '.join(args)} wrote no report (crashed?):\n{output[-3000:]}")
        reports[rank] = json.loads(path.read_text())
    return proc.returncode, output, reports


def _weights(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"rank{rank}.pt")


def _assert_bit_identical(out: Path, baseline: Path) -> None:
    for rank in (0, 1):
        ours, theirs = _weights(out, rank), _weights(baseline, rank)
        assert ours.keys() == theirs.keys()
        assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == [], f"rank {rank}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_baseline")
    code, output, reports = _run(out, "--monitor", "none")
    assert code == 0, output[-3000:]
    return out, reports


def test_fsdp2_strict_logs_once_from_rank_zero_and_training_is_bit_identical(tmp_path, baseline):
    code, output, reports = _run(tmp_path, "--monitor", "strict")
    assert code == 0, output[-3000:]
    assert reports[0]["logged_steps"] == [0, 2, 4] and reports[0]["step"] == 4
    assert reports[1]["logged_steps"] == [] and reports[1]["step"] == 4
    assert reports[0]["warnings"] == reports[1]["warnings"] == []
    run_dir = tmp_path / "tb" / "version_0"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # rank 1 wrote nothing
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    for tag in ("saliency/tsm", "saliency/all"):
        assert [e.step for e in acc.Images(tag)] == [0, 2, 4]
    baseline_dir, baseline_reports = baseline
    _assert_bit_identical(tmp_path, baseline_dir)
    for rank in (0, 1):  # no extra (or missing) collective inside any training step
        assert reports[rank]["collectives_per_batch"] == baseline_reports[rank]["collectives_per_batch"]


def test_fsdp2_mixed_precision_and_layer_discovery_on_every_rank(tmp_path, baseline):
    # bfloat16 gathered parameters: the probe must be cast as the root's skipped pre-forward would cast it.
    code, output, reports = _run(tmp_path, "--monitor", "strict", "--mixed-precision", "--layer", "auto")
    assert code == 0, output[-3000:]
    assert reports[0]["logged_steps"] == [0, 2, 4] and reports[1]["logged_steps"] == []
    for rank in (0, 1):
        assert reports[rank]["layer"] == "backbone.4"
        assert any("no layer given, monitoring 'backbone.4'" in w for w in reports[rank]["warnings"])
        assert reports[rank]["collectives_per_batch"] == baseline[1][rank]["collectives_per_batch"]


def test_fsdp2_failure_inside_the_forward_on_one_rank_skips_on_every_rank(tmp_path, baseline):
    code, output, reports = _run(tmp_path, "--monitor", "lenient", "--fail-on-rank", "1")
    assert code == 0, output[-3000:]
    for rank in (0, 1):
        assert reports[rank]["step"] == 4 and reports[rank]["logged_steps"] == []
        # steps 0, 2 and 4; the end of training does not retry step 4, which was just attempted
        assert len(reports[rank]["warnings"]) == 3
        assert all(
            "skipped step" in w and "rank 1: RuntimeError: injected failure on rank 1" in w
            for w in reports[rank]["warnings"]
        )
    assert _image_tags(tmp_path) == []
    baseline_dir, baseline_reports = baseline
    _assert_bit_identical(tmp_path, baseline_dir)  # the half-run forward left no trace in FSDP's state
    for rank in (0, 1):
        assert reports[rank]["collectives_per_batch"] == baseline_reports[rank]["collectives_per_batch"]


def test_fsdp2_strict_failure_before_the_forward_on_rank_zero_raises_on_every_rank(tmp_path):
    # Rank zero fails before its model runs: rank one's forward must need no collective (all gathered up front).
    code, output, reports = _run(tmp_path, "--monitor", "strict", "--fail-on-rank", "0", "--fail", "forward-start")
    assert code != 0, output[-3000:]
    assert reports[0]["error"] == "RuntimeError: injected failure on rank 0"
    assert reports[1]["error"].startswith("RuntimeError: SaliencyMonitor failed at step 0 on rank 0 (rank 0: ")
    assert "injected failure on rank 0" in reports[1]["error"]
    assert reports[0]["step"] == reports[1]["step"] == 0


def test_fsdp2_strict_logging_failure_on_rank_zero_raises_on_every_rank(tmp_path):
    # The forward succeeded everywhere; rank zero's writing of step 0 failed after it (on the background writer),
    # which the next run reports: the others must raise too, at that step.
    code, output, reports = _run(tmp_path, "--monitor", "strict", "--fail-on-rank", "0", "--fail", "log")
    assert code != 0, output[-3000:]
    assert reports[0]["step"] == reports[1]["step"] == 2
    expected = "RuntimeError: writing the run of step 0 failed: OSError: injected logging failure on rank 0"
    assert reports[0]["error"] == expected
    assert reports[1]["error"].startswith(
        f"RuntimeError: SaliencyMonitor failed at step 2 on rank 0 (rank 0: {expected}"
    )


def _image_tags(out: Path) -> list[str]:
    run_dir = out / "tb" / "version_0"
    if not list(run_dir.glob("events.out.tfevents.*")):
        return []
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    return acc.Tags()["images"]
