"""What importing the package costs: no optional dependency on import, and a command line that answers at once.

Each check runs in a fresh interpreter (this process has imported everything already), with the package under test
first on its path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tsm_lightning

ROOT = Path(tsm_lightning.__file__).resolve().parents[1]
OPTIONAL = ("tensorly", "lightly", "pytorch_lightning")


def python(code: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {k: v for k, v in os.environ.items() if k != "TSM_LIGHTNING_DEBUG"} | {"PYTHONPATH": path}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def loaded_after(statements: str) -> dict[str, bool]:
    names = (*OPTIONAL, "torch")
    res = python(f"import sys, json\n{statements}\nprint(json.dumps({{m: m in sys.modules for m in {names!r}}}))")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_importing_the_package_and_the_callback_loads_no_optional_dependency():
    loaded = loaded_after(
        "import tsm_lightning, tsm_lightning.callbacks\n"
        "from tsm_lightning import SaliencyMonitor, explain, saliency_maps, tucker_saliency\n"
        "import tsm_lightning.metrics, tsm_lightning.render, tsm_lightning.probe, tsm_lightning.data"
    )
    assert loaded["torch"]  # the statements above did load the library itself
    assert not any(loaded[name] for name in OPTIONAL), loaded


def test_bare_import_does_not_load_torch():
    # `import tsm_lightning` is lazy: the console script's parser runs before any heavy import.
    assert loaded_after("import tsm_lightning") == dict.fromkeys((*OPTIONAL, "torch"), False)


def test_missing_extras_raise_an_import_error_naming_the_extra():
    blocked = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorly', 'pytorch_lightning'):\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    call = "import torch\nfrom tsm_lightning import tucker_saliency\ntucker_saliency(torch.rand(1, 4, 3, 3))"
    res = python(blocked + call)
    assert res.returncode != 0 and "pip install 'tsm-lightning[tucker]'" in res.stderr, res.stderr
    res = python(blocked + "import tsm_lightning.callbacks.pl")
    assert res.returncode != 0 and "pip install 'tsm-lightning[pl]'" in res.stderr, res.stderr


@pytest.mark.parametrize("argv", [[], ["explain"], ["explain", "--arch", "resnet18", "--bogus"], ["--help"]])
def test_cli_usage_error_answers_without_importing_torch(argv):
    res = python(
        "import sys\nfrom tsm_lightning.cli import main\n"
        f"code = main({argv!r})\nprint('torch' in sys.modules, code, file=sys.stderr)"
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"False {0 if argv == ['--help'] else 2}", res.stderr


def test_cli_usage_error_is_fast():
    # Well under a second on a loaded 2-core machine; the best of three runs, to ignore a momentary stall.
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path}
    times = []
    for _ in range(3):
        start = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "tsm_lightning.cli"], env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        assert res.returncode == 2 and res.stderr.startswith("error: ")
    assert min(times) < 0.5, times
