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
the server's RSS every 30 s and its slope in MB per 100 requests.

The server's memory comes from /proc (--pid, or the process listening on the port). Loopback only:
it refuses any other host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

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
        async with client.stream("POST", f"{self.url}{path}", json=body) as response:
            async for _ in response.aiter_raw():
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
            async for message in ws:
                if isinstance(message, bytes):
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


async def soak(
    url: str, concurrency: int, seconds: float, seed: int, pid: int | None, port: int, every: float
) -> dict[str, object]:
    state = Soak(url, random.Random(seed))
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    samples: list[tuple[float, int, float]] = []  # (seconds since start, requests done, server RSS MB)

    async def sample_memory() -> None:
        while True:
            if (rss := server_rss_mb(pid, port)) is not None:
                samples.append((round(time.monotonic() - started, 1), state.requests, rss))
            await asyncio.sleep(every)

    # Longer than any REQUEST_TIMEOUT of a sane server: the server ends a request (504) before this client gives up.
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                try:
                    await state.one(client)
                except Exception as exc:  # a dropped connection, a timeout: the server must never cause one
                    state.count("client", type(exc).__name__)
                    state.failures.append(f"client {exc!r}"[:300])

        sampler = asyncio.ensure_future(sample_memory())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        sampler.cancel()
    if (rss := server_rss_mb(pid, port)) is not None:
        samples.append((round(time.monotonic() - started, 1), state.requests, rss))
    slope = None
    if len(samples) >= 3 and samples[-1][1] > samples[0][1]:
        slope = round(100 * statistics.linear_regression([s[1] for s in samples], [s[2] for s in samples]).slope, 3)
    return {
        "seconds": round(time.monotonic() - started),
        "concurrency": concurrency,
        "seed": seed,
        "requests": state.requests,
        "server_failures": len(state.failures),
        "failures": state.failures[:20],
        "outcomes": dict(sorted(state.outcomes.items())),
        "rss_mb_per_100_requests": slope,
        "rss_samples": samples,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


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
    parser.add_argument("--soak", type=float, default=0, help="run the hostile mix for this many seconds instead")
    parser.add_argument("--seed", type=int, default=0, help="the soak's mix")
    parser.add_argument("--rss-every", type=float, default=30.0, help="seconds between the soak's memory samples")
    parser.add_argument("--text", default=THREE_SENTENCES)
    parser.add_argument("--pid", type=int, help="server process id, for its memory")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    host = urlparse(args.url).hostname or ""
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        raise SystemExit("loadtest only targets a server on this machine (loopback)")
    port = urlparse(args.url).port or 80
    if args.soak:
        summary = asyncio.run(soak(args.url, args.concurrency, args.soak, args.seed, args.pid, port, args.rss_every))
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
