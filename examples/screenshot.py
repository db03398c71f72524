"""Take a screenshot of TensorBoard's images or scalars tab for a log folder, in headless Chromium.

    python examples/screenshot.py --logdir runs --out docs/tensorboard_images.png
    python examples/screenshot.py --logdir runs --page scalars --filter 'tsm/pointing_game|random/pointing_game' \
        --out docs/pointing_game.png

Starts ``tensorboard`` on localhost, waits until it serves the run, then has Debian's ``chromium`` render the
images dashboard headless (flags suited to a machine without network or GPU) and write a PNG.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--out", default="docs/tensorboard_images.png")
    parser.add_argument("--browser", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--size", default="1400,1000", help="window size W,H")
    parser.add_argument("--wait", type=float, default=12.0, help="seconds the page gets to render")
    parser.add_argument("--page", choices=("images", "scalars"), default="images", help="TensorBoard tab")
    parser.add_argument("--filter", default="saliency/(tsm|all)", help="TensorBoard's tag filter (a regex)")
    args = parser.parse_args(argv)
    if not Path(args.browser).exists():
        sys.exit(f"error: no browser at {args.browser}; install Debian's chromium (apt-get install chromium).")

    port = _free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    server = subprocess.Popen(
        [
            str(tensorboard),
            "--logdir",
            args.logdir,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--samples_per_plugin",
            "images=1000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if b"saliency" in urllib.request.urlopen(f"{base}/data/plugin/images/tags", timeout=2).read():
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            sys.exit("error: TensorBoard did not serve any saliency images; check --logdir.")
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [
                    args.browser,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={profile}",
                    f"--window-size={args.size}",
                    "--hide-scrollbars",
                    f"--virtual-time-budget={int(args.wait * 1000)}",
                    f"--screenshot={out}",
                    f"{base}/?darkMode=false#{args.page}&tagFilter={urllib.parse.quote(args.filter, safe='')}"
                    "&_smoothingWeight=0&_ignoreYOutliers=false",
                ],
                check=True,
                timeout=120,
                capture_output=True,
            )
        print(f"Wrote {out}")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
