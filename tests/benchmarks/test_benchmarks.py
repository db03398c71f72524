"""Every benchmark script runs end to end at tiny sizes (``--quick``), so none of them can rot unnoticed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_run_all_quick_prints_every_table(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--threads", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for heading in ("_maps:", "_forward:", "_callback:", "_total:"):
        assert heading in out, heading
    assert out.count("|---") >= 4  # the markdown tables themselves


def test_method_study_and_localization_on_a_one_step_demo(tmp_path):
    runs = tmp_path / "study"
    study = subprocess.run(
        [
            *(sys.executable, str(ROOT / "benchmarks" / "method_study.py"), "--seeds", "0", "--output", str(runs)),
            *("--num-images", "16", "--faithfulness-images", "4", "--", "--max-steps", "1", "--num-samples", "64"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert study.returncode == 0, study.stderr[-3000:]
    for row in ("| tsm |", "| tsm_first_row (authors' code) |", "| mtsm_abs_after_sum |", "| centre prior |"):
        assert row in study.stdout, row
    (checkpoint,) = runs.glob("seed0/simclr/version_0/checkpoints/last.ckpt")
    localization = subprocess.run(
        [
            *(sys.executable, str(ROOT / "benchmarks" / "localization.py"), "--example", "simclr"),
            *("--checkpoint", str(checkpoint), "--num-images", "8"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert localization.returncode == 0, localization.stderr[-3000:]
    assert "| tsm |" in localization.stdout and "random map" in localization.stdout
