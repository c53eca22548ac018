"""Helpers the test modules share (fixtures are in conftest.py): the stand-in engine, test server processes,
clients of the transports, and the fuzzing strategies."""

from __future__ import annotations

import asyncio
import base64
import ctypes
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck
from hypothesis import strategies as st
from starlette.testclient import TestClient

import server

ROOT = Path(__file__).resolve().parent
SERVER_SOURCE = ROOT / os.environ.get("SERVER_SOURCE", ".")  # whose server.py the test servers run (make golden)
MODELS = ("turbo", "standard", "multilingual")
TEST_CHUNK_MAX_CHARS = 100  # the test servers' model calls are short: random models always run to their budget
ENGINES = (*MODELS, "piper")


class ToneEngine(server.ChunkEngine):
    """A stand-in engine: a tone whose length follows the text, in two pieces per chunk."""

    name = "tone"
    sample_rate = 24000

    def load(self) -> None:
        self.loads = getattr(self, "loads", 0) + 1

    def warm_up(self) -> None: ...

    def unload(self) -> None:
        self.unloads = getattr(self, "unloads", 0) + 1

    def prepare_voice(self, voice: server.VoiceRef, exaggeration: float) -> Any:
        return 200.0 if voice.path is None else 300.0

    def synthesize(
        self, text: str, voice: Any, params: server.SynthesisParams, phonemes: server.PhonemeSpans = ()
    ) -> Iterator[np.ndarray | server.TextMarks]:
        n = 240 * len(text)
        tone = 0.3 * np.sin(2 * np.pi * voice * np.arange(n) / self.sample_rate) + 0.01 * torch.rand(n).numpy()
        yield tone[: n // 2].astype(np.float32)
        yield tone[n // 2 :].astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"engine": "tone", "languages": ["en"]}


class Response(Protocol):
    """What the helpers read of a response: httpx's from the test servers, or httpx2's (the same API, another
    package) from Starlette's TestClient, which uses httpx2 where it is installed."""

    @property
    def status_code(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    def json(self, **kwargs: Any) -> Any: ...


def assert_openai_error(response: Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


class SlowToneEngine(ToneEngine):
    """Many short pieces with a pause each: long enough to queue behind, cancel or time out."""

    pause = 0.05

    def synthesize(
        self, text: str, voice: Any, params: server.SynthesisParams, phonemes: server.PhonemeSpans = ()
    ) -> Iterator[np.ndarray | server.TextMarks]:
        for piece in super().synthesize(text * 4, voice, params):
            if isinstance(piece, server.TextMarks):
                yield piece
                continue
            for part in np.array_split(piece, 8):
                time.sleep(self.pause)
                yield part


def fake_app(tmp_path: Path, engine: server.Engine | None = None, **settings: Any) -> TestClient:
    config = server.Settings(voices_dir=str(tmp_path / "voices"), **settings)
    return TestClient(server.create_app(config, engine or SlowToneEngine()))


TWILIO_SID = "MZ00000000000000000000000000000001"


def twilio_start(**custom: str) -> str:
    """Twilio's start message, as it sends it; `custom` are the <Parameter>s of the <Stream>."""
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": TWILIO_SID,
            "start": {
                "streamSid": TWILIO_SID,
                "accountSid": "AC0",
                "callSid": "CA0",
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": custom,
            },
        }
    )


FUZZ: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": list(HealthCheck),
}
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=60)  # lone surrogates and controls too
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**30), 10**30),
    st.floats(),
    ANY_TEXT,
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
SPEECH_TEXT = st.one_of(
    ANY_TEXT,
    st.sampled_from(
        ["Hello there.", "One. Two! Three?", "Dr. Who paid $3.50 at 9 a.m.", "字。字！", "   ", "?!...", "x" * 300]
    ),
    JUNK,
)
SYNTHESIS_FIELDS = {
    "voice": st.one_of(
        st.sampled_from(["default", "alloy", "nobody", "../x", ""]),
        st.fixed_dictionaries({"id": st.sampled_from(["alloy", "nobody"])}),
        JUNK,
    ),
    "response_format": st.one_of(st.sampled_from([*server.AUDIO_FORMATS, "", "midi"]), JUNK),
    "format": st.one_of(st.sampled_from(["pcm", "wav", "ulaw"]), JUNK),
    "output_format": st.one_of(
        st.tuples(
            st.sampled_from(["pcm", "ulaw", "alaw", "mp3", "opus", "wav"]),
            st.sampled_from(["0", "8000", "16000", "24000", "44100", "48000", "9" * 5000]),
            st.sampled_from(["", "_0", "_64", "_320", "_100000", "_" + "9" * 5000]),
        ).map("{0[0]}_{0[1]}{0[2]}".format),
        st.text(max_size=12),
        JUNK,
    ),
    "sample_rate": st.one_of(st.sampled_from([*server.SAMPLE_RATES, 0, -1, 12345]), JUNK),
    "speed": st.one_of(st.floats(0.1, 5.0), JUNK),
    "exaggeration": st.one_of(st.floats(0.0, 3.0), JUNK),
    "cfg_weight": st.one_of(st.floats(-1.0, 2.0), JUNK),
    "temperature": st.one_of(st.floats(0.0, 6.0), JUNK),
    "seed": st.one_of(st.integers(-5, 2**33), JUNK),
    "language": st.one_of(st.sampled_from(["en", "EN", "", "fr"]), JUNK),
}
# What json.dumps cannot write but a client can send: deep nesting, integers past Python's digit limit.
HOSTILE_JSON = st.sampled_from(
    [
        "",
        '"extra": ' + "[" * 50_000 + "]" * 50_000,
        '"seed": ' + "9" * 5000,
        '"sample_rate": ' + "9" * 5000,
        '"speed": 1e999',
    ]
)


def with_hostile_json(body: dict[str, Any], fragment: str) -> str:
    raw = json.dumps(body)
    return raw if not fragment else raw[:-1] + (", " if body else "") + fragment + "}"


WS_IDS = st.one_of(st.sampled_from(["a", "b"]), JUNK)


def assert_no_server_failure(error: dict[str, Any]) -> None:
    assert isinstance(error["message"], str) and error["message"], error
    assert error["code"] not in ("synthesis_failed", "internal_error"), error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_with_parent() -> None:
    """In a test server's process: it gets SIGTERM when pytest ends, however it ends (pytest-timeout's
    hard stop included), rather than living on and holding CI open."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    def __init__(
        self,
        kind: str,
        model_dir: Path | None,
        voices_dir: Path,
        command: list[str] | None = None,
        port: int | None = None,  # a restarted replica keeps its address (scaleout_test.py)
        **env: str,
    ):
        self.kind = kind
        self.env = env
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.voices_dir = voices_dir
        log = voices_dir.parent / f"server-{kind}-{self.port}.log"
        for n in itertools.count(2):  # a replica restarted on its port writes a log of its own
            if not log.exists():
                break
            log = log.with_name(f"server-{kind}-{self.port}-{n}.log")
        self.log = open(log, "w+")  # noqa: SIM115 (closed in stop)
        full_env = {
            **os.environ,
            "TTS_MODEL": kind,
            "MODEL_DIR": str(model_dir or ""),
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "VOICES_DIR": str(voices_dir),
            "HF_HUB_OFFLINE": "1",
            "CHUNK_MAX_CHARS": str(TEST_CHUNK_MAX_CHARS),
            # Seeded requests repeat across tests, which must exercise the pipeline, not the result cache.
            "RESULT_CACHE_MB": "0",
            **env,
        }
        self.proc = subprocess.Popen(
            command or [sys.executable, str(SERVER_SOURCE / "server.py")],
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=end_with_parent,
        )

    def wait_ready(self, timeout: float = 600) -> None:  # a loaded shared 2-core machine loads Turbo in ~150 s
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.kind} server not ready:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@contextmanager
def serving(srv: ServerProcess) -> Iterator[ServerProcess]:
    """A started server, once it is ready; stopped however the block ends (a fixture yields inside it)."""
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@dataclass
class ToolRun:
    """A tool's command, run as a user runs it (from the repository, its output in files), in the background."""

    args: list[str]
    env: dict[str, str]
    directory: Path  # its output files, and whatever else it writes
    timeout: float
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.directory / "stdout", "wb") as out, open(self.directory / "stderr", "wb") as err:
            self.proc = subprocess.Popen(
                self.args, env={**os.environ, **self.env}, stdout=out, stderr=err, cwd=ROOT, preexec_fn=end_with_parent
            )

    def result(self) -> subprocess.CompletedProcess[str]:
        assert self.proc is not None
        self.proc.wait(self.timeout)
        out, err = ((self.directory / name).read_text() for name in ("stdout", "stderr"))
        return subprocess.CompletedProcess(self.args, self.proc.returncode, out, err)


ToolResult = tuple[ToolRun, subprocess.CompletedProcess[str]]


def tool_run(name: str, checkpoints: dict[str, Path], directory: Path) -> ToolRun:
    """The tools tools_test.py runs (its tests' `tool_run` markers name them), on the tiny checkpoints."""
    gpu_check = ["tools/gpu_check.py", "--dry-run", "--checkpoints", str(checkpoints["turbo"].parent)]
    gpu_check += ["--options", "defaults", "--skip", "tests,bench", "--out", str(directory / "report.md")]
    bench = {
        "bench": ["--model", "turbo", "--tokens", "12", "--runs", "1"],
        "bench_concurrency": ["--concurrency", "2", "--tokens", "30", "--runs", "1"],
        "bench_s3gen": ["--s3gen", "--tokens", "40", "--runs", "1", "--plan", "10,20:8"],
    }
    if name == "gpu_check":
        return ToolRun([sys.executable, *gpu_check], {}, directory, timeout=600)
    env = {"MODEL_DIR": str(checkpoints["turbo"]), "HF_HUB_OFFLINE": "1"}
    return ToolRun([sys.executable, "bench.py", *bench[name]], env, directory, timeout=300)


def load_tool(name: str) -> Any:
    """A module of tools/ (the tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


def speak(srv: ServerProcess, timeout: float = 120, **body: Any) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/audio/speech", json=body, timeout=timeout)


def stream_pcm(srv: ServerProcess, **body: Any) -> bytes:
    """The raw PCM stream of a request: what every streaming transport sends (whole files are
    decoded in one pass per sentence, streams in windows, so the two differ slightly)."""
    response = httpx.post(f"{srv.url}/v1/audio/speech/stream/pcm", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.content


def read_wav(data: bytes) -> tuple[int, np.ndarray]:
    """A WAV as the server sends it (as it is made): the open-ended header (RIFF and data sizes
    0xFFFFFFFF), then all the PCM."""
    assert data[4:8] == data[40:44] == b"\xff\xff\xff\xff"
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return w.getframerate(), np.frombuffer(data[44:], "<i2")


def sse_events(srv: ServerProcess, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    from httpx_sse import connect_sse

    with httpx.Client(timeout=120) as client, connect_sse(client, "POST", f"{srv.url}{path}", json=body) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        events = []
        for sse in source.iter_sse():
            event = json.loads(sse.data)
            assert sse.event == event["type"]
            events.append(event)
    return events


class WsClient:
    def __init__(self, srv: ServerProcess):
        from websockets.sync.client import connect

        self.ws = connect(f"ws://127.0.0.1:{srv.port}/v1/audio/speech/ws", max_size=None)

    def send(self, **message: Any) -> None:
        self.ws.send(json.dumps(message))

    def recv(self, timeout: float = 60) -> dict[str, Any] | bytes:
        data = self.ws.recv(timeout=timeout)
        return data if isinstance(data, bytes) else json.loads(data)

    def until_done(self, utterance: str, timeout: float = 120) -> tuple[bytes, list[dict[str, Any]]]:
        audio, messages = b"", []
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv(deadline - time.monotonic())
            if isinstance(message, bytes):
                audio += message
                continue
            messages.append(message)
            if message["type"] == "audio":
                audio += base64.b64decode(message["audio"])
            if message["type"] == "done" and message.get("id") == utterance:
                return audio, messages

    def close(self) -> None:
        self.ws.close()


class TwilioCall:
    """Twilio's side of a bidirectional Media Stream: connected, start, the caller's audio, each mark
    echoed once "played", stop."""

    def __init__(self, srv: ServerProcess, query: str = "", caller_audio: bool = True, **custom: str):
        from websockets.sync.client import connect

        self.ws = connect(f"ws://127.0.0.1:{srv.port}/v1/telephony/twilio{query}", max_size=None)
        self.send(event="connected", protocol="Call", version="1.0.0")
        self.ws.send(twilio_start(**custom))
        if caller_audio:  # not where the server may already have closed the stream after `start`
            self.send(
                event="media",
                sequenceNumber="2",
                streamSid=TWILIO_SID,
                media={
                    "track": "inbound",
                    "chunk": "1",
                    "timestamp": "5",
                    "payload": base64.b64encode(b"\xff" * 160).decode(),
                },
            )

    def send(self, **event: Any) -> None:
        self.ws.send(json.dumps(event))

    def recv(self, timeout: float = 60) -> dict[str, Any]:
        message = json.loads(self.ws.recv(timeout=timeout))
        assert message["streamSid"] == TWILIO_SID, message
        return message

    def until_marks(self, count: int, timeout: float = 120) -> dict[str, bytes]:
        """Each mark's name and the mu-law audio sent before it, every frame exactly 20 ms."""
        spoken: dict[str, bytes] = {}
        import adapters

        audio = b""
        deadline = time.monotonic() + timeout
        while len(spoken) < count:
            message = self.recv(deadline - time.monotonic())
            if message["event"] == "media":
                frame = base64.b64decode(message["media"]["payload"])
                assert len(frame) == adapters.TWILIO_FRAME_BYTES
                audio += frame
            else:
                assert message["event"] == "mark", message
                spoken[message["mark"]["name"]] = audio
                audio = b""
                self.send(event="mark", streamSid=TWILIO_SID, mark=message["mark"])
        return spoken

    def close_code(self, timeout: float = 30) -> int | None:
        """How the server closed the stream (media still on its way is skipped)."""
        from websockets.exceptions import ConnectionClosed

        deadline = time.monotonic() + timeout
        with pytest.raises(ConnectionClosed):
            while True:
                assert json.loads(self.ws.recv(timeout=deadline - time.monotonic()))["event"] == "media"
        return self.ws.close_code


def padded(ulaw: bytes) -> bytes:
    import adapters

    return ulaw + b"\xff" * (-len(ulaw) % adapters.TWILIO_FRAME_BYTES)


def status_of(srv: ServerProcess) -> dict[str, Any]:
    return httpx.get(f"{srv.url}/v1/status", timeout=10).json()


def wait_idle(srv: ServerProcess, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = status_of(srv)
        if status["queue"]["active"] == 0 and status["queue"]["waiting_units"] == 0 and not status["queue"]["running"]:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


ADAPTER_ENGINES = ("piper", "turbo")


async def audiosocket_call(port: int, first: bytes) -> tuple[list[tuple[int, bytes, float]], float]:
    """Play Asterisk's side: send the first frame, then collect frames until the server hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(first)
    started, frames = time.monotonic(), []
    try:
        while True:
            header = await asyncio.wait_for(reader.readexactly(3), 120)
            payload = await reader.readexactly(int.from_bytes(header[1:], "big"))
            frames.append((header[0], payload, time.monotonic() - started))
            if header[0] == 0x00:
                assert await asyncio.wait_for(reader.read(), 30) == b""  # and the socket closes
                return frames, started
    finally:
        writer.close()
