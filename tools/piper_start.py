"""A Piper server's start: seconds from launch to /ready, and its RSS once ready (before any request).

    .venv/bin/python tools/piper_start.py TREE [TREE...] [--runs 3]

Runs each TREE's server.py (TTS_MODEL=piper, with this interpreter) --runs times, the trees alternating, one
server at a time, and prints each start and the medians. To compare with another commit, export its tree:
`git archive REV | tar -x -C /tmp/before`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PORT = 18741


def start(tree: Path) -> tuple[float, float]:
    """Seconds to ready and RSS in MB then, of one server started from `tree`."""
    env = {**os.environ, "TTS_MODEL": "piper", "PORT": str(PORT), "HOST": "127.0.0.1", "HF_HUB_OFFLINE": "1"}
    began = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(tree / "server.py")], env=env, cwd=tree, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{tree}'s server exited with {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{PORT}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        ready = time.monotonic() - began
        status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        rss_kb = int(next(line for line in status if line.startswith("VmRSS:")).split()[1])
        return ready, rss_kb / 1024
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", type=Path, help="source trees, each with its server.py")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    starts: dict[Path, list[tuple[float, float]]] = {tree: [] for tree in args.trees}
    for _ in range(args.runs):
        for tree in args.trees:
            ready, rss = start(tree.resolve())
            starts[tree].append((ready, rss))
            print(f"{tree}: ready in {ready:.2f} s, RSS {rss:.0f} MB", flush=True)
    for tree, runs in starts.items():
        ready = statistics.median(r for r, _ in runs)
        rss = statistics.median(m for _, m in runs)
        print(f"{tree}: median of {len(runs)}: ready in {ready:.2f} s, RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
