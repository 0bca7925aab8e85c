"""Open a report page in headless Chromium, offline, and save a screenshot of it.

``python docs/screenshot_report.py REPORT.html OUT.png`` checks that the page
``train.evaluate --report`` writes renders in a real browser from the file
alone (no server, no network: Chromium's background connections are off) and
keeps a picture of its top (``docs/report.png`` in the README). Chromium comes
from the Debian packages (``apt-get install chromium``); ``--chromium`` names
another binary. Exit code 0 when the screenshot was written, 1 otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--blink-settings=imagesEnabled=true")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file, from its header."""
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def screenshot(report: Path, out: Path, width: int = 1200, height: int = 1800, chromium: str | None = None,
               timeout_s: float = 120.0) -> tuple[int, int]:
    """Render ``report`` and write ``out``; returns the screenshot's size.

    Raises:
        FileNotFoundError: no report, or no Chromium.
        RuntimeError: Chromium failed or wrote no picture.
    """
    binary = chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise FileNotFoundError("no chromium on PATH: apt-get install chromium (or pass --chromium)")
    if not report.is_file():
        raise FileNotFoundError(f"no report page at {report}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        res = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                              f"--screenshot={out.resolve()}", report.resolve().as_uri()],
                             capture_output=True, text=True, timeout=timeout_s)
    if res.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium exited {res.returncode} without a screenshot: {res.stderr[-2000:]}")
    return png_size(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python docs/screenshot_report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path, help="the report page (report.html)")
    p.add_argument("out", type=Path, help="the screenshot to write (.png)")
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=1800)
    p.add_argument("--chromium", help="the browser binary (default: chromium on PATH)")
    args = p.parse_args(argv)
    try:
        size = screenshot(args.report, args.out, args.width, args.height, args.chromium)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {size[0]} x {size[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
