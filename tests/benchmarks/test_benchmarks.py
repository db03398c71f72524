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
