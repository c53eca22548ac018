"""Drive a running server with N concurrent clients: latency and throughput, or a hostile soak.

    python tools/loadtest.py --url http://127.0.0.1:8000 --concurrency 4 --requests 8
    python tools/loadtest.py --concurrency 4 --soak 1800          # 30 minutes of every transport, abuse included

Without --soak, each client streams raw PCM from /v1/audio/speech/stream/pcm and measures time to
first audio (first byte) and the real-time factor (wall time / audio duration). Reports p50/p95/p99
time to first audio, mean RTF, 429s, errors, and the server's resident memory before and after.

With --soak S, each client runs a seeded mix for S seconds: whole files, `stream_format` audio, SSE,
/stream/pcm, WebSocket utterances (whole, incremental, cancelled), Twilio calls, clients that leave
mid-stream, and bad input (broken and hostile JSON, unspeakable text, out-of-range values, text/plain,
cross-origin posts). It reports requests, outcomes by status (WebSocket and Twilio ones by their
message), the count of server failures (5xx, or a failure message on a socket; there must be none),
the server's RSS and open descriptors every 30 s and the RSS slope in MB per 100 requests.

With --hostile N (soak only), phases of --phase seconds alternate, calm then hostile: in hostile
phases N more clients hold what a hostile client can hold (idle and slowloris connections, an Asterisk
call paused with MEDIA_XOFF, silent ElevenLabs contexts, a silent OpenAI WebSocket utterance, a silent
Twilio socket, an idle Wyoming connection with --wyoming-port), each until the server cuts it; one the
server has not cut after --hostile-bound seconds is a server failure. The normal clients' time to first
audio is reported by phase, so the hostile clients' effect on it shows in the same run.

The server's memory comes from /proc (--pid, or the process listening on the port). Loopback only:
it refuses any other host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlparse

import httpx

THREE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog. "
    "Streaming speech should start long before the whole text is done. "
    "This third sentence closes the request."
)


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
        async with client.stream(
            "POST", f"{url}/v1/audio/speech/stream/pcm", json={"input": text, "voice": "default"}
        ) as response:
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


async def run(url: str, concurrency: int, requests: int, text: str) -> tuple[Results, float]:
    results = Results()
    counter = iter(range(requests))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:

        async def worker() -> None:
            while next(counter, None) is not None:
                await one_request(client, url, text, results)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


# --- Soak: every transport, clients that leave, bad input ---------------------------

SENTENCES = [
    "Good morning, and welcome back.",
    "The meeting moved to half past three.",
    "Dr. Smith paid $3.50 for 2.5 kg of apples, i.e. a bargain.",
    "Is this the right number? Yes!",
    "Streaming speech should start long before the whole text is done.",
    "One. Two. Three.",
]
FAILURE_CODES = {"synthesis_failed", "internal_error"}  # what a socket says where HTTP would say 5xx
HOSTILE_BODIES = [  # raw bytes, each answered with a 4xx
    b"{not json",
    b"[1, 2]",
    b'{"input": "Hi.", "voice": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"input": "Hi.", "seed": ' + b"9" * 5000 + b"}",
    b'{"input": "Hi \\ud800 there."}',
    b'{"input": "Hi \\u0000 there."}',
    b'{"input": "Hi.", "sample_rate": 0}',
    b'{"input": "Hi.", "output_format": "pcm_0"}',
    b'{"input": "Hi.", "output_format": "opus_48000_100000"}',
    b'{"input": "Hi.", "response_format": ""}',
    b'{"input": "Hi.", "voice": "nobody"}',
    b'{"input": "Hi.", "speed": 99}',
    b'{"input": ""}',
    json.dumps({"input": "Mr. " * 1200}).encode(),
    json.dumps({"input": "x" * 9000}).encode(),
]


@dataclass
class Soak:
    url: str
    rng: random.Random
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # 5xx and failure messages: must stay empty
    requests: int = 0
    phase: str = "calm"  # or "hostile": while the hostile clients run
    first_audio: dict[str, list[float]] = field(default_factory=lambda: {"calm": [], "hostile": []})

    def heard(self, started: float) -> None:
        """A normal stream's first audio arrived: its wait counts toward the phase it started in."""
        self.first_audio[self.phase].append(time.perf_counter() - started)

    def count(self, scenario: str, outcome: str | int) -> None:
        self.requests += 1
        self.outcomes[f"{scenario} {outcome}"] += 1
        if (isinstance(outcome, int) and outcome >= 500) or any(code in str(outcome) for code in FAILURE_CODES):
            self.failures.append(f"{scenario} {outcome}")

    def text(self, sentences: int = 2) -> str:
        return " ".join(self.rng.choice(SENTENCES) for _ in range(sentences))

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[4:]

    async def whole_file(self, client: httpx.AsyncClient) -> None:
        fmt = self.rng.choice(["mp3", "wav", "pcm", "opus", "flac", "ulaw"])
        response = await client.post(f"{self.url}/v1/audio/speech", json={"input": self.text(), "response_format": fmt})
        self.count(f"file-{fmt}", response.status_code)

    async def stream(self, client: httpx.AsyncClient, path: str, body: dict[str, Any], leave: bool) -> None:
        started, first = time.perf_counter(), True
        async with client.stream("POST", f"{self.url}{path}", json=body) as response:
            async for chunk in response.aiter_raw():
                if first and chunk and response.status_code == 200:
                    self.heard(started)
                    first = False
                if leave:
                    break  # the client goes away mid-stream
        self.count(f"{path.rsplit('/', 1)[-1]}{'-left' if leave else ''}", response.status_code)

    async def websocket(self) -> None:
        import websockets

        kind = self.rng.choice(["whole", "incremental", "cancel", "leave", "bad"])
        async with websockets.connect(f"{self.ws_url}/v1/audio/speech/ws", max_size=None) as ws:
            if kind == "bad":
                await ws.send(
                    self.rng.choice(
                        [
                            '{"type": "dance"}',
                            "{oops",
                            '{"type": "append", "id": "x", "text": "x"}',
                            '{"type": "speak", "id": "u", "text": "Hi \\ud800."}',
                        ]
                    )
                )
                reply = json.loads(await asyncio.wait_for(ws.recv(), 600))
                self.count("ws-bad", f"{reply['type']}:{reply.get('code')}")
                return
            if kind == "incremental":
                await ws.send(json.dumps({"type": "speak", "id": "u", "text": "", "final": False}))
                for word in self.text().split():
                    await ws.send(json.dumps({"type": "append", "id": "u", "text": word + " "}))
                await ws.send(json.dumps({"type": "end", "id": "u"}))
            else:
                await ws.send(json.dumps({"type": "speak", "id": "u", "text": self.text(3)}))
            started, first = time.perf_counter(), True
            async for message in ws:
                if isinstance(message, bytes):
                    if first:
                        self.heard(started)
                        first = False
                    if kind == "cancel":
                        await ws.send(json.dumps({"type": "cancel", "id": "u"}))
                        kind = "cancelled"
                    elif kind == "leave":
                        self.count("ws-left", "closed")
                        return  # closes the socket mid-utterance
                    continue
                reply = json.loads(message)
                if reply["type"] in ("done", "error"):
                    self.count(f"ws-{kind}", f"{reply['type']}:{reply.get('code', '')}")
                    return

    async def twilio(self) -> None:
        import websockets

        sid = "MZ" + "0" * 32
        async with websockets.connect(f"{self.ws_url}/v1/telephony/twilio", max_size=None) as ws:
            await ws.send(
                json.dumps(
                    {
                        "event": "start",
                        "streamSid": sid,
                        "start": {"streamSid": sid, "customParameters": {"text": self.text(2)}},
                    }
                )
            )
            marks = 0
            async for message in ws:
                event = json.loads(message)
                if event["event"] == "error":
                    self.count("twilio", f"error:{event['error']['code']}")
                    return
                if event["event"] == "mark":
                    marks += 1
                    await ws.send(json.dumps({"event": "mark", "streamSid": sid, "mark": event["mark"]}))
                    if marks == 2 or self.rng.random() < 0.3:
                        break
            await ws.send(json.dumps({"event": "stop", "streamSid": sid}))
            self.count("twilio", "marks")

    async def hostile(self, client: httpx.AsyncClient) -> None:
        body = self.rng.choice(HOSTILE_BODIES)
        headers = self.rng.choices(
            [
                {"content-type": "application/json"},
                {"content-type": "text/plain"},
                {"content-type": "application/json", "origin": "http://evil.example"},
            ],
            weights=[8, 1, 1],
        )[0]
        response = await client.post(f"{self.url}/v1/audio/speech", content=body, headers=headers)
        self.count("hostile", response.status_code)

    async def one(self, client: httpx.AsyncClient) -> None:
        pick = self.rng.random()
        body = {"input": self.text(), "response_format": "pcm"}
        if pick < 0.15:
            await self.whole_file(client)
        elif pick < 0.25:
            await self.stream(client, "/v1/audio/speech", {**body, "stream_format": "audio"}, leave=False)
        elif pick < 0.35:
            await self.stream(client, "/v1/audio/speech/stream", body, leave=self.rng.random() < 0.3)
        elif pick < 0.50:
            await self.stream(client, "/v1/audio/speech/stream/pcm", body, leave=self.rng.random() < 0.3)
        elif pick < 0.70:
            await self.websocket()
        elif pick < 0.80:
            await self.twilio()
        else:
            await self.hostile(client)


@dataclass
class Hostile:
    """Clients that hold what they can (a connection, a slot, a context) and never let go: each kind runs
    until the server cuts it, and what it held and how it ended are counted."""

    url: str
    bound: float  # a client still held after this long is a server failure
    wyoming_port: int | None
    held: dict[str, list[float]] = field(default_factory=dict)
    ends: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    turns: int = 0  # the kinds take turns, so that a short soak has each

    @property
    def kinds(self) -> list[str]:
        kinds = ["idle", "slowloris", "xoff", "silent_contexts", "silent_utterance", "silent_twilio"]
        return kinds + (["wyoming_idle"] if self.wyoming_port else [])

    @property
    def address(self) -> tuple[str, int]:
        parts = urlparse(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 80

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[4:]

    async def one(self) -> None:
        from websockets.exceptions import ConnectionClosed

        kind = self.kinds[self.turns % len(self.kinds)]
        self.turns += 1
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.bound):
                end = await getattr(self, kind)()
        except ConnectionClosed as exc:
            end = f"closed {exc.rcvd.code if exc.rcvd else 'without a close frame'}"
        except TimeoutError:
            end = "not cut"
            self.failures.append(f"hostile {kind}: still held after {self.bound:g} s")
        except (OSError, EOFError) as exc:  # the server cut the connection under a write
            end = type(exc).__name__
        self.held.setdefault(kind, []).append(time.monotonic() - started)
        self.ends[f"{kind} {end}"] += 1

    async def idle(self, port: int | None = None) -> str:
        """A TCP connection that never sends a byte."""
        host, http_port = self.address
        reader, writer = await asyncio.open_connection(host, port or http_port)
        try:
            reply = await reader.read()
            return "closed" if not reply else reply.split(b"\r\n", 1)[0].decode(errors="replace")
        finally:
            writer.close()

    async def wyoming_idle(self) -> str:
        return await self.idle(self.wyoming_port)

    async def slowloris(self) -> str:
        """A request head sent a byte every two seconds, never finished."""
        reader, writer = await asyncio.open_connection(*self.address)
        reply = asyncio.ensure_future(reader.read())
        try:
            for byte in b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.wait([reply], timeout=2)
                if reply.done():
                    break
            data = await reply
            return "closed" if not data else data.split(b"\r\n", 1)[0].decode(errors="replace")
        finally:
            reply.cancel()
            writer.close()

    async def xoff(self) -> str:
        """An Asterisk call that pauses the media (MEDIA_XOFF) at its first audio and never resumes."""
        import websockets

        text = " ".join(SENTENCES)
        url = f"{self.ws_url}/v1/telephony/asterisk?text={quote(text)}"
        async with websockets.connect(url, subprotocols=["media"], max_size=None) as ws:  # type: ignore[list-item]
            await ws.send("MEDIA_START connection_id:c1 channel:WebSocket/tts/0x1 format:ulaw optimal_frame_size:160")
            paused = False
            async for message in ws:
                if isinstance(message, bytes) and not paused:
                    await ws.send("MEDIA_XOFF")
                    paused = True
            return f"closed {ws.close_code}"

    async def silent_contexts(self) -> str:
        """Eight ElevenLabs contexts opened and never given text."""
        import websockets

        url = f"{self.ws_url}/v1/text-to-speech/default/multi-stream-input?output_format=pcm_16000"
        async with websockets.connect(url, max_size=None) as ws:
            for n in range(8):
                await ws.send(json.dumps({"text": " ", "context_id": f"c{n}"}))
            async for _ in ws:
                pass
            return f"closed {ws.close_code}"

    async def silent_utterance(self) -> str:
        """An OpenAI-style WebSocket utterance whose text stops mid-sentence."""
        import websockets

        async with websockets.connect(f"{self.ws_url}/v1/audio/speech/ws", max_size=None) as ws:
            await ws.send(json.dumps({"type": "speak", "id": "u", "text": "And the rest is", "final": False}))
            async for message in ws:
                if isinstance(message, str) and (reply := json.loads(message))["type"] in ("error", "done"):
                    return f"{reply['type']}:{reply.get('code', '')}"
            return f"closed {ws.close_code}"

    async def silent_twilio(self) -> str:
        """A Twilio socket that never sends its start."""
        import websockets

        async with websockets.connect(f"{self.ws_url}/v1/telephony/twilio", max_size=None) as ws:
            async for _ in ws:
                pass
            return f"closed {ws.close_code}"


async def soak(
    url: str,
    concurrency: int,
    seconds: float,
    seed: int,
    pid: int | None,
    port: int,
    every: float,
    hostile: int = 0,
    phase: float = 120.0,
    bound: float = 120.0,
    wyoming_port: int | None = None,
) -> dict[str, object]:
    state = Soak(url, random.Random(seed))
    hostiles = Hostile(url, bound, wyoming_port)
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    samples: list[tuple[float, int, float, int | None, str]] = []  # (s since start, requests, RSS MB, fds, phase)

    async def sample_memory() -> None:
        while True:
            if (rss := server_rss_mb(pid, port)) is not None:
                samples.append(
                    (round(time.monotonic() - started, 1), state.requests, rss, server_fds(pid, port), state.phase)
                )
            await asyncio.sleep(every)

    async def alternate() -> None:
        while True:
            await asyncio.sleep(phase)
            state.phase = "hostile" if state.phase == "calm" else "calm"

    async def hostile_client() -> None:
        while time.monotonic() < deadline:
            if state.phase != "hostile":
                await asyncio.sleep(0.5)
                continue
            try:
                await hostiles.one()
            except Exception as exc:  # a client-side surprise: counted, never fatal to the soak
                hostiles.ends[f"client {type(exc).__name__}"] += 1

    # Longer than any REQUEST_TIMEOUT of a sane server: the server ends a request (504) before this client gives up.
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                try:
                    await state.one(client)
                except Exception as exc:  # a dropped connection, a timeout: the server must never cause one
                    state.count("client", type(exc).__name__)
                    state.failures.append(f"client {exc!r}"[:300])

        background = [asyncio.ensure_future(sample_memory())]
        if hostile:
            background.append(asyncio.ensure_future(alternate()))
        await asyncio.gather(*(worker() for _ in range(concurrency)), *(hostile_client() for _ in range(hostile)))
        for task in background:
            task.cancel()
    if (rss := server_rss_mb(pid, port)) is not None:
        samples.append((round(time.monotonic() - started, 1), state.requests, rss, server_fds(pid, port), state.phase))
    slope = None
    if len(samples) >= 3 and samples[-1][1] > samples[0][1]:
        slope = round(100 * statistics.linear_regression([s[1] for s in samples], [s[2] for s in samples]).slope, 3)
    failures = state.failures + hostiles.failures
    summary: dict[str, object] = {
        "seconds": round(time.monotonic() - started),
        "concurrency": concurrency,
        "seed": seed,
        "requests": state.requests,
        "server_failures": len(failures),
        "failures": failures[:20],
        "outcomes": dict(sorted(state.outcomes.items())),
        "first_audio": {
            name: {"n": len(waits), "p50_s": round(percentile(waits, 50), 3), "p95_s": round(percentile(waits, 95), 3)}
            for name, waits in state.first_audio.items()
        },
        "rss_mb_per_100_requests": slope,
        "rss_samples": samples,
    }
    if hostile:
        summary["hostile"] = {
            "clients": hostile,
            "phase_s": phase,
            "held_s": {
                kind: {"n": len(held), "p50": round(percentile(held, 50), 1), "max": round(max(held), 1)}
                for kind, held in sorted(hostiles.held.items())
            },
            "ends": dict(sorted(hostiles.ends.items())),
        }
    return summary


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def server_pid(pid: int | None, port: int) -> int | None:
    """The server's process: --pid, or the process listening on the port."""
    if pid is not None:
        return pid
    try:
        out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
        return int(out.split("pid=")[1].split(",")[0]) if "pid=" in out else None
    except (OSError, ValueError, IndexError):
        return None


def server_fds(pid: int | None, port: int) -> int | None:
    """The server's open descriptors."""
    if (pid := server_pid(pid, port)) is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def server_rss_mb(pid: int | None, port: int) -> float | None:
    if (pid := server_pid(pid, port)) is None:
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
    parser.add_argument("--soak", type=float, default=0, help="run the hostile mix for this many seconds instead")
    parser.add_argument("--seed", type=int, default=0, help="the soak's mix")
    parser.add_argument("--rss-every", type=float, default=30.0, help="seconds between the soak's memory samples")
    parser.add_argument("--hostile", type=int, default=0, help="hostile clients in the soak's hostile phases")
    parser.add_argument("--phase", type=float, default=120.0, help="seconds of each calm and hostile phase")
    parser.add_argument(
        "--hostile-bound", type=float, default=120.0, help="a hostile client not cut by then is a server failure"
    )
    parser.add_argument("--wyoming-port", type=int, help="the server's WYOMING_PORT, for idle Wyoming connections")
    parser.add_argument("--text", default=THREE_SENTENCES)
    parser.add_argument("--pid", type=int, help="server process id, for its memory")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    host = urlparse(args.url).hostname or ""
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        raise SystemExit("loadtest only targets a server on this machine (loopback)")
    port = urlparse(args.url).port or 80
    if args.soak:
        summary = asyncio.run(
            soak(
                args.url,
                args.concurrency,
                args.soak,
                args.seed,
                args.pid,
                port,
                args.rss_every,
                args.hostile,
                args.phase,
                args.hostile_bound,
                args.wyoming_port,
            )
        )
        print(json.dumps(summary, indent=None if args.json else 1))
        raise SystemExit(1 if summary["server_failures"] else 0)
    requests = args.requests or 2 * args.concurrency
    before = server_rss_mb(args.pid, port)
    results, wall = asyncio.run(run(args.url, args.concurrency, requests, args.text))
    after = server_rss_mb(args.pid, port)
    summary = {
        "concurrency": args.concurrency,
        "completed": len(results.rtf),
        "rejected_429": results.rejected,
        "errors": len(results.errors),
        "ttfa_p50_s": percentile(results.first_audio, 50),
        "ttfa_p95_s": percentile(results.first_audio, 95),
        "ttfa_p99_s": percentile(results.first_audio, 99),
        "rtf_mean": statistics.fmean(results.rtf) if results.rtf else float("nan"),
        "audio_s": round(results.audio_seconds, 2),
        "wall_s": round(wall, 2),
        "aggregate_rtf": wall / results.audio_seconds if results.audio_seconds else float("nan"),
        "server_rss_mb_before": before,
        "server_rss_mb_after": after,
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
