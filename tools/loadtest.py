"""Drive a running server with N concurrent streaming clients and report latency and throughput.

    python tools/loadtest.py --url http://127.0.0.1:8000 --concurrency 4 --requests 8
    python tools/loadtest.py --concurrency 16 --soak 300          # keep 16 streams busy for 5 minutes

Each client streams raw PCM from /v1/audio/speech/stream/pcm and measures time to
first audio (first byte) and the real-time factor (wall time / audio duration).
Reports p50/p95/p99 time to first audio, mean RTF, 429s, errors, and the server's
resident memory before and after (from /proc, when --pid is given or the server
runs on this machine). Loopback only: it refuses any other host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

THREE_SENTENCES = ("The quick brown fox jumps over the lazy dog. "
                   "Streaming speech should start long before the whole text is done. "
                   "This third sentence closes the request.")


@dataclass
class Results:
    first_audio: list[float] = field(default_factory=list)
    rtf: list[float] = field(default_factory=list)
    audio_seconds: float = 0.0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)


async def one_request(client: httpx.AsyncClient, url: str, text: str, results: Results) -> None:
    start = time.perf_counter()
    first = None
    size = 0
    try:
        async with client.stream("POST", f"{url}/v1/audio/speech/stream/pcm",
                                 json={"input": text, "voice": "default"}) as response:
            if response.status_code == 429:
                results.rejected += 1
                await response.aread()
                return
            if response.status_code != 200:
                results.errors.append(f"{response.status_code}: {(await response.aread())[:200]!r}")
                return
            rate = int(response.headers.get("x-sample-rate", "24000"))
            async for chunk in response.aiter_raw():
                if first is None and chunk:
                    first = time.perf_counter() - start
                size += len(chunk)
    except httpx.HTTPError as exc:
        results.errors.append(repr(exc))
        return
    elapsed = time.perf_counter() - start
    seconds = size / 2 / rate
    if first is not None and seconds > 0:
        results.first_audio.append(first)
        results.rtf.append(elapsed / seconds)
        results.audio_seconds += seconds


async def run(url: str, concurrency: int, requests: int, soak: float, text: str) -> tuple[Results, float]:
    results = Results()
    deadline = time.monotonic() + soak if soak else None
    counter = iter(range(requests)) if not soak else None
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        async def worker() -> None:
            while True:
                if deadline is not None:
                    if time.monotonic() >= deadline:
                        return
                elif next(counter, None) is None:
                    return
                await one_request(client, url, text, results)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def server_rss_mb(pid: int | None, port: int) -> float | None:
    if pid is None:
        try:
            out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
            pid = int(out.split("pid=")[1].split(",")[0]) if "pid=" in out else None
        except (OSError, ValueError, IndexError):
            pid = None
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=0, help="total requests (default: 2 per client)")
    parser.add_argument("--soak", type=float, default=0, help="run for this many seconds instead")
    parser.add_argument("--text", default=THREE_SENTENCES)
    parser.add_argument("--pid", type=int, help="server process id, for its memory")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    host = urlparse(args.url).hostname or ""
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        raise SystemExit("loadtest only targets a server on this machine (loopback)")
    port = urlparse(args.url).port or 80
    requests = args.requests or 2 * args.concurrency
    before = server_rss_mb(args.pid, port)
    results, wall = asyncio.run(run(args.url, args.concurrency, requests, args.soak, args.text))
    after = server_rss_mb(args.pid, port)
    summary = {
        "concurrency": args.concurrency, "completed": len(results.rtf), "rejected_429": results.rejected,
        "errors": len(results.errors), "ttfa_p50_s": percentile(results.first_audio, 50),
        "ttfa_p95_s": percentile(results.first_audio, 95), "ttfa_p99_s": percentile(results.first_audio, 99),
        "rtf_mean": statistics.fmean(results.rtf) if results.rtf else float("nan"),
        "audio_s": round(results.audio_seconds, 2), "wall_s": round(wall, 2),
        "aggregate_rtf": wall / results.audio_seconds if results.audio_seconds else float("nan"),
        "server_rss_mb_before": before, "server_rss_mb_after": after,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")
        for error in results.errors[:5]:
            print("error:", error)


if __name__ == "__main__":
    main()
