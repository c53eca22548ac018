"""Tests: pure helpers in-process, transports on a fake engine, and every endpoint end to end
on real (tiny, random-weight) Chatterbox checkpoints served by real server processes.

Run with `make test` (offline: HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

import server

ROOT = Path(__file__).resolve().parent
MODELS = ("turbo", "standard", "multilingual")


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------

SENTENCE_CASES = [
    ("Mr. Smith went to Washington. He arrived at 3 p.m. on Monday.",
     ["Mr. Smith went to Washington.", "He arrived at 3 p.m. on Monday."]),
    ("Dr. Jones and Mrs. Lee met Prof. Brown.", ["Dr. Jones and Mrs. Lee met Prof. Brown."]),
    ("The U.S. is big. It has 50 states.", ["The U.S. is big.", "It has 50 states."]),
    ("Apples, pears, etc. are fruit. Eat them.", ["Apples, pears, etc. are fruit.", "Eat them."]),
    ("See e.g. the manual. It helps.", ["See e.g. the manual.", "It helps."]),
    ("Pi is 3.14159 roughly. Nice!", ["Pi is 3.14159 roughly.", "Nice!"]),
    ("Room No. 5 is free.", ["Room No. 5 is free."]),
    ("J. R. R. Tolkien wrote books. Good ones.", ["J. R. R. Tolkien wrote books.", "Good ones."]),
    ("Wait... what? Really!", ["Wait... what?", "Really!"]),
    ("I paused… Then I spoke.", ["I paused…", "Then I spoke."]),
    ("It was... fine, I guess.", ["It was... fine, I guess."]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("(This is quoted.) And this is not.", ["(This is quoted.)", "And this is not."]),
    ("Really?! Yes.", ["Really?!", "Yes."]),
    ("Visit example.com today. Thanks.", ["Visit example.com today.", "Thanks."]),
    ("- first item\n- second item\n* third item", ["first item", "second item", "third item"]),
    ("Shopping list:\n1. Buy milk.\n2. Walk the dog", ["Shopping list:", "1. Buy milk.", "2. Walk the dog"]),
    ("A line that wraps\nonto the next line. Done.", ["A line that wraps onto the next line.", "Done."]),
    ("First paragraph\n\nSecond paragraph", ["First paragraph", "Second paragraph"]),
    ("你好。今天天气很好！我们去公园吧？", ["你好。", "今天天气很好！", "我们去公园吧？"]),
    ("こんにちは。元気ですか？", ["こんにちは。", "元気ですか？"]),
    ("No ending punctuation", ["No ending punctuation"]),
    ("   \n\n  ", []),
    ("... !!! ???", []),
]


@pytest.mark.parametrize("text,expected", SENTENCE_CASES)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert server.split_sentences(text) == expected


def test_pack_chunks_respects_limit_and_order() -> None:
    sentences = [f"Sentence number {i} is here." for i in range(30)]
    chunks = server.pack_chunks(sentences, 80)
    assert all(len(c) <= 80 for c in chunks)
    assert " ".join(chunks) == " ".join(sentences)
    assert len(chunks) < len(sentences)  # short sentences are packed together


@pytest.mark.parametrize("sentence", [
    "word " * 100,  # spaces only
    "clause one, " * 30,  # clause punctuation
    "字" * 500,  # CJK, no spaces at all
])
def test_pack_chunks_splits_long_sentences(sentence: str) -> None:
    chunks = server.pack_chunks([sentence.strip()], 60)
    assert all(0 < len(c) <= 60 for c in chunks)
    assert "".join(chunks).replace(" ", "") == sentence.replace(" ", "")


def test_text_chunks_keep_all_text() -> None:
    text = "Hello there. " * 50
    chunks = server.text_chunks(text, 120)
    assert sum(c.count("Hello") for c in chunks) == 50


def test_speech_token_budget_grows_with_text_and_is_capped() -> None:
    short, longer = server.speech_token_budget("Hi."), server.speech_token_budget("Hello there, friend." * 3)
    assert 0 < short < longer < 1000
    assert server.speech_token_budget("x" * 5000) == 1000
    assert server.speech_token_budget("你好世界") > server.speech_token_budget("abcd")


# ---------------------------------------------------------------------------
# Audio DSP
# ---------------------------------------------------------------------------


def test_float_to_pcm16_scales_and_clips() -> None:
    pcm = np.frombuffer(server.float_to_pcm16(np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0])), "<i2")
    assert pcm.tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767]


def test_wav_header_is_a_valid_riff_file() -> None:
    pcm = server.float_to_pcm16(np.sin(np.arange(2400) / 10.0) * 0.5)
    data = server.wav_header(24000, len(pcm) // 2) + pcm
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (24000, 1, 2, 2400)
        assert w.readframes(2400) == pcm
    streaming = server.wav_header(8000, None)
    assert len(streaming) == 44 and streaming[4:8] == b"\xff\xff\xff\xff" and streaming[40:44] == b"\xff\xff\xff\xff"


def test_chunk_joiner_crossfades_without_losing_audio() -> None:
    joiner = server.ChunkJoiner(overlap=100)
    pieces = [(np.full(1000, 0.5, np.float32), True), (np.full(300, 0.5, np.float32), False),
              (np.full(50, 0.5, np.float32), True), (np.full(1000, 0.5, np.float32), True)]
    out = np.concatenate([joiner.push(p, starts) for p, starts in pieces] + [joiner.finish()])
    # Each segment join overlaps 100 samples, a short segment only its own length; pieces of one
    # segment are not overlapped at all.
    assert len(out) == 2350 - 50 - 100
    # Crossfading equal signals keeps them equal: the fades sum to one, so no dip or click.
    np.testing.assert_allclose(out, 0.5, atol=1e-6)


def test_chunk_joiner_join_is_smooth() -> None:
    joiner = server.ChunkJoiner(overlap=480)
    a, b = np.full(4800, 0.8, np.float32), np.full(4800, -0.8, np.float32)
    out = np.concatenate([joiner.push(a, True), joiner.push(b, True), joiner.finish()])
    assert np.max(np.abs(np.diff(out))) < 0.01  # a hard cut would jump by 1.6


def test_decode_audio_reads_wav_and_rejects_garbage() -> None:
    clip = (0.3 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)).astype(np.float32)
    audio, rate = server.decode_audio(server.wav_header(16000, len(clip)) + server.float_to_pcm16(clip))
    assert rate == 16000 and len(audio) == 16000
    np.testing.assert_allclose(audio, clip, atol=1e-3)
    with pytest.raises(Exception):
        server.decode_audio(b"definitely not audio" * 100)


def test_change_speed_changes_duration_not_pitch() -> None:
    rate = 24000
    tone = np.sin(2 * np.pi * 300 * np.arange(rate) / rate).astype(np.float32)
    fast = server.change_speed(tone, 2.0)
    assert abs(len(fast) - rate / 2) < rate * 0.02
    spectrum = np.abs(np.fft.rfft(fast[2000:-2000] * np.hanning(len(fast) - 4000)))
    peak_hz = np.argmax(spectrum) * rate / (len(fast) - 4000)
    assert abs(peak_hz - 300) < 10


# ---------------------------------------------------------------------------
# Config, caches, scheduler
# ---------------------------------------------------------------------------


def test_settings_from_env() -> None:
    s = server.Settings.from_env({"PORT": "9000", "TTS_MODEL": "standard", "CHUNK_MAX_CHARS": "120"})
    assert (s.port, s.tts_model, s.chunk_max_chars, s.host) == (9000, "standard", 120, "0.0.0.0")
    with pytest.raises(SystemExit, match="PORT"):
        server.Settings.from_env({"PORT": "eighty"})
    with pytest.raises(SystemExit, match="TTS_MODEL"):
        server.Settings.from_env({"TTS_MODEL": "nope"})
    with pytest.raises(SystemExit, match="DEVICE"):
        server.Settings.from_env({"DEVICE": "tpu"})


def test_voice_cache_is_lru_keyed_by_hash_and_exaggeration() -> None:
    cache = server.VoiceCache(2)
    made: list[tuple[str, float]] = []

    def get(key: tuple[str, float]) -> Any:
        return cache.get(key, lambda: made.append(key) or key)

    get(("a", 0.5)), get(("a", 0.5)), get(("a", 0.7)), get(("b", 0.5)), get(("a", 0.5))
    assert made == [("a", 0.5), ("a", 0.7), ("b", 0.5), ("a", 0.5)]  # ("a", 0.5) was evicted
    assert (cache.hits, cache.misses) == (1, 4)


def test_rng_stream_reproduces_under_interleaving() -> None:
    def draws(order: list[str]) -> dict[str, list[float]]:
        streams = {"a": server.RngStream(1), "b": server.RngStream(2)}
        out: dict[str, list[float]] = {"a": [], "b": []}
        for name in order:
            with streams[name].active():
                out[name].append(float(torch.rand(1)))
        return out

    alone = draws(["a", "a", "a", "b", "b", "b"])
    mixed = draws(["a", "b", "b", "a", "b", "a"])
    assert alone == mixed
    assert alone["a"] != alone["b"]


def test_inference_worker_runs_by_priority_then_fifo() -> None:
    worker = server.InferenceWorker()
    order: list[str] = []

    async def scenario() -> None:
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()
        blocker = asyncio.ensure_future(worker.run(lambda: asyncio.run_coroutine_threadsafe(gate.wait(), loop)
                                                   .result(), server.Priority.FILE))
        await asyncio.sleep(0.05)  # the blocker now occupies the thread
        jobs = [asyncio.ensure_future(worker.run(lambda n=n: order.append(n), p)) for n, p in
                [("file1", 1), ("bg", 2), ("rt1", 0), ("file2", 1), ("rt2", 0)]]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(blocker, *jobs)

    asyncio.run(scenario())
    worker.stop()
    assert order == ["rt1", "rt2", "file1", "file2", "bg"]


def test_inference_worker_delivers_errors() -> None:
    worker = server.InferenceWorker()

    async def scenario() -> None:
        with pytest.raises(ZeroDivisionError):
            await worker.run(lambda: 1 / 0)
        assert await worker.run(lambda: 42) == 42  # the thread survives

    asyncio.run(scenario())
    worker.stop()


# ---------------------------------------------------------------------------
# Transports on a fake engine (fast; the real engine is tested end to end below)
# ---------------------------------------------------------------------------


class ToneEngine(server.Engine):
    """A stand-in engine: a tone whose length follows the text, in two pieces per chunk."""

    name = "tone"
    sample_rate = 24000

    def load(self) -> None: ...

    def warm_up(self) -> None: ...

    def prepare_voice(self, clip: np.ndarray | None, sample_rate: int, exaggeration: float) -> Any:
        return 200.0 if clip is None else 300.0

    def synthesize(self, text: str, voice: Any, params: server.SynthesisParams) -> Iterator[np.ndarray]:
        n = 240 * len(text)
        tone = 0.3 * np.sin(2 * np.pi * voice * np.arange(n) / self.sample_rate) + 0.01 * torch.rand(n).numpy()
        yield tone[: n // 2].astype(np.float32)
        yield tone[n // 2 :].astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"engine": "tone", "languages": ["en"]}


@pytest.fixture()
def fake_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = server.Settings(voices_dir=str(tmp_path / "voices"), max_input_chars=200, chunk_max_chars=40)
    with TestClient(server.create_app(settings, ToneEngine())) as client:
        deadline = time.time() + 10
        while client.get("/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.01)
        yield client


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


BAD_SPEECH_REQUESTS = [
    ({"input": ""}, 400, "input"),
    ({"input": "   \n "}, 400, "input"),
    ({"input": "?!..."}, 400, "input"),
    ({}, 400, "input"),
    ({"input": 5}, 400, "input"),
    ({"input": "x" * 201}, 413, "input"),
    ({"input": "Hi.", "voice": "nobody"}, 404, "voice"),
    ({"input": "Hi.", "voice": "../../etc/passwd"}, 404, "voice"),
    ({"input": "Hi.", "voice": {"id": "nobody"}}, 404, "voice"),
    ({"input": "Hi.", "response_format": "midi"}, 400, "response_format"),
    ({"input": "Hi.", "speed": 10}, 422, "speed"),
    ({"input": "Hi.", "speed": 0.1}, 422, "speed"),
    ({"input": "Hi.", "exaggeration": 3}, 422, "exaggeration"),
    ({"input": "Hi.", "exaggeration": 0.1}, 422, "exaggeration"),
    ({"input": "Hi.", "cfg_weight": 1.5}, 422, "cfg_weight"),
    ({"input": "Hi.", "temperature": 0}, 422, "temperature"),
    ({"input": "Hi.", "temperature": 9}, 422, "temperature"),
    ({"input": "Hi.", "seed": -1}, 422, "seed"),
    ({"input": "Hi.", "speed": "fast"}, 422, "speed"),
    ({"input": "Hi.", "language": "fr"}, 400, "language"),
]


@pytest.mark.parametrize("body,status,param", BAD_SPEECH_REQUESTS)
def test_speech_rejects_bad_input(fake_client: TestClient, body: dict[str, Any], status: int, param: str) -> None:
    assert_openai_error(fake_client.post("/v1/audio/speech", json=body), status, param)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_speech_rejects_malformed_json(fake_client: TestClient, raw: bytes) -> None:
    response = fake_client.post("/v1/audio/speech", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_speech_rejects_huge_body(fake_client: TestClient) -> None:
    body = json.dumps({"input": "x" * (2 * 1024 * 1024)}).encode()
    assert_openai_error(fake_client.post("/v1/audio/speech", content=body), 413)


def test_unknown_route_and_method_use_error_shape(fake_client: TestClient) -> None:
    assert_openai_error(fake_client.get("/v1/nothing"), 404)
    assert_openai_error(fake_client.get("/v1/audio/speech"), 405)


def test_speech_ignores_unknown_fields_and_accepts_voice_object(fake_client: TestClient) -> None:
    body = {"model": "gpt-4o-mini-tts", "input": "Hello there.", "voice": {"id": "alloy"}, "instructions": "calm",
            "stream_format": "audio", "something_new": [1, 2], "response_format": "pcm", "seed": 3}
    response = fake_client.post("/v1/audio/speech", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "audio/pcm"
    assert len(response.content) == 2 * 240 * len("Hello there.")


def test_speech_joins_chunks_of_long_input(fake_client: TestClient) -> None:
    text = "One two three four. Five six seven eight. Nine ten eleven twelve."
    response = fake_client.post("/v1/audio/speech", json={"input": text, "response_format": "pcm", "seed": 1})
    chunks = server.text_chunks(text, 40)
    assert len(chunks) == 3
    overlap = int(server.JOIN_CROSSFADE_SECONDS * 24000)
    assert len(response.content) // 2 == 240 * sum(len(c) for c in chunks) - overlap * (len(chunks) - 1)


def test_ready_is_503_until_loaded(tmp_path: Path) -> None:
    class SlowEngine(ToneEngine):
        def load(self) -> None:
            time.sleep(0.5)

    settings = server.Settings(voices_dir=str(tmp_path))
    with TestClient(server.create_app(settings, SlowEngine())) as client:
        response = client.get("/ready")
        assert response.status_code == 503 and response.headers["retry-after"]
        error = assert_openai_error(client.post("/v1/audio/speech", json={"input": "Hi."}), 503)
        assert error["code"] == "model_loading"
        assert client.get("/health").status_code == 200
        time.sleep(1)
        assert client.get("/ready").status_code == 200


# ---------------------------------------------------------------------------
# End to end: real servers on tiny random Chatterbox checkpoints
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    dirs = {kind: root / kind for kind in MODELS}

    def build(kind: str) -> None:
        subprocess.run([sys.executable, str(ROOT / "tools" / "random_checkpoint.py"), str(dirs[kind]),
                        "--model", kind, "--tiny", "--seed", "7"], check=True, capture_output=True)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(build, MODELS))
    return dirs


class ServerProcess:
    def __init__(self, kind: str, model_dir: Path, voices_dir: Path, **env: str):
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.voices_dir = voices_dir
        self.log = open(voices_dir.parent / f"server-{kind}-{self.port}.log", "w+")
        full_env = {**os.environ, "TTS_MODEL": kind, "MODEL_DIR": str(model_dir), "PORT": str(self.port),
                    "HOST": "127.0.0.1", "VOICES_DIR": str(voices_dir), "HF_HUB_OFFLINE": "1", **env}
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "server.py")], env=full_env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.ready_after: float | None = None

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    self.ready_after = time.monotonic() - self.started
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


@pytest.fixture(scope="session")
def servers(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    procs = {}
    for kind in MODELS:
        voices = tmp_path_factory.mktemp(f"voices-{kind}")
        procs[kind] = ServerProcess(kind, checkpoints[kind], voices)
    try:
        for proc in procs.values():
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(params=MODELS)
def live(request: pytest.FixtureRequest, servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers[request.param]


def speak(srv: ServerProcess, timeout: float = 120, **body: Any) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/audio/speech", json=body, timeout=timeout)


def read_wav(data: bytes) -> tuple[int, np.ndarray]:
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        frames = w.readframes(w.getnframes())
        assert len(frames) == 2 * w.getnframes()
        return w.getframerate(), np.frombuffer(frames, "<i2")


def test_health_ready_models(live: ServerProcess) -> None:
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{live.url}/ready").status_code == 200
    models = httpx.get(f"{live.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == f"chatterbox-{live.kind}"


def test_tiny_server_is_ready_quickly(servers: dict[str, ServerProcess]) -> None:
    # Three servers start at once on 2 cores here, so this bound is loose; alone each takes ~10 s.
    for proc in servers.values():
        assert proc.ready_after is not None and proc.ready_after < 90
        print(f"{proc.kind} ready after {proc.ready_after:.1f} s")


def test_speech_wav_is_real_audio(live: ServerProcess) -> None:
    response = speak(live, input="Hello world. This is a test.", seed=1)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    rate, samples = read_wav(response.content)
    assert rate == 24000
    assert len(samples) > 24000 * 0.2
    assert np.abs(samples).max() > 0  # not silence


def test_speech_pcm_equals_wav_payload_and_fixed_seed_is_byte_identical(live: ServerProcess) -> None:
    body = {"input": "Deterministic speech, please.", "seed": 1234}
    wav1 = speak(live, **body, response_format="wav").content
    wav2 = speak(live, **body, response_format="wav").content
    pcm = speak(live, **body, response_format="pcm")
    assert pcm.headers["content-type"] == "audio/pcm"
    assert wav1 == wav2
    assert wav1[44:] == pcm.content
    other = speak(live, **body | {"seed": 4321}, response_format="pcm").content
    assert other != pcm.content


def test_speech_token_cap_bounds_runaway_generation(live: ServerProcess) -> None:
    # A random T3 never samples end-of-speech: only the per-call cap stops it.
    text = "Short."
    _, samples = read_wav(speak(live, input=text, seed=2).content)
    max_seconds = server.speech_token_budget("Short.") / 25 + 1.0
    assert len(samples) / 24000 <= max_seconds


def test_long_input_is_synthesized_in_chunks(live: ServerProcess) -> None:
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)
    assert len(server.text_chunks(text, server.Settings().chunk_max_chars)) >= 2
    response = speak(live, input=text, seed=3, response_format="pcm")
    assert response.status_code == 200
    assert len(response.content) > 2 * 24000 * 5


def test_concurrent_requests_keep_their_own_voice_and_seed(live: ServerProcess, tmp_path: Path) -> None:
    clip_path = tmp_path / "clip.wav"
    clip_path.write_bytes(wav_bytes(reference_clip(seed=11)))
    upload_voice(live, "concurrent", clip_path).raise_for_status()
    requests = [{"input": "First voice speaking now.", "voice": "default", "seed": 5, "response_format": "pcm"},
                {"input": "Second voice speaking now.", "voice": "concurrent", "seed": 6, "response_format": "pcm"}]
    alone = [speak(live, **r).content for r in requests]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda r: speak(live, **r).content, requests * 2))
    assert together == alone * 2


def reference_clip(seed: int, seconds: float = 6.0, rate: int = 24000) -> np.ndarray:
    sys.path.insert(0, str(ROOT / "tools"))
    from random_checkpoint import reference_clip as make

    return make(seed, seconds, rate)


def wav_bytes(clip: np.ndarray, rate: int = 24000) -> bytes:
    return server.wav_header(rate, len(clip)) + server.float_to_pcm16(clip)


def upload_voice(srv: ServerProcess, name: str, path: Path, filename: str | None = None) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(f"{srv.url}/v1/audio/voices", data={"name": name},
                          files={"file": (filename or path.name, f, "application/octet-stream")}, timeout=60)


def test_voice_upload_list_speak_replace_delete(live: ServerProcess, tmp_path: Path) -> None:
    clip_a, clip_b = tmp_path / "a.wav", tmp_path / "b.flac"
    clip_a.write_bytes(wav_bytes(reference_clip(seed=1)))
    import soundfile

    soundfile.write(clip_b, reference_clip(seed=2, seconds=7) * 0.5 + 0.1 * np.sin(np.arange(7 * 24000) / 3),
                    24000, format="FLAC")

    created = upload_voice(live, "guest", clip_a)
    assert created.status_code == 201, created.text
    assert created.json()["id"] == "guest"
    ids = {v["id"]: v for v in httpx.get(f"{live.url}/v1/audio/voices").json()["data"]}
    assert ids["guest"]["type"] == "uploaded" and ids["default"]["type"] == "builtin"
    assert ids["alloy"]["type"] == "alias"

    body = {"input": "Cloned voice test.", "voice": "guest", "seed": 9, "response_format": "pcm"}
    first = speak(live, **body).content
    default = speak(live, **body | {"voice": "default"}).content
    assert first != default  # the clip changed the conditionals

    assert upload_voice(live, "guest", clip_b).status_code == 201  # replace with another clip and format
    replaced = speak(live, **body).content
    assert replaced != first  # the cache is keyed by content: no stale voice
    assert sorted(p.name for p in live.voices_dir.iterdir() if p.stem == "guest") == ["guest.flac"]

    assert httpx.delete(f"{live.url}/v1/audio/voices/guest").json()["deleted"] is True
    assert_openai_error(speak(live, **body), 404, "voice")
    assert_openai_error(httpx.delete(f"{live.url}/v1/audio/voices/guest"), 404)


def test_openai_voice_name_maps_to_default_unless_uploaded(live: ServerProcess, tmp_path: Path) -> None:
    body = {"input": "Alias test.", "seed": 4, "response_format": "pcm"}
    default = speak(live, **body, voice="default").content
    assert speak(live, **body, voice="nova").content == default
    clip = tmp_path / "nova.wav"
    clip.write_bytes(wav_bytes(reference_clip(seed=3)))
    assert upload_voice(live, "nova", clip).status_code == 201
    try:
        assert speak(live, **body, voice="nova").content != default
    finally:
        httpx.delete(f"{live.url}/v1/audio/voices/nova")


BAD_UPLOADS = [
    ("ok_name", 2.0, "a.wav", 400, "file"),  # too short
    ("ok_name", 31.0, "a.wav", 400, "file"),  # too long
    ("bad name!", 6.0, "a.wav", 400, "name"),
    ("x" * 65, 6.0, "a.wav", 400, "name"),
    ("default", 6.0, "a.wav", 400, "name"),
    ("ok_name", 6.0, "a.txt", 400, "file"),
]


@pytest.mark.parametrize("name,seconds,filename,status,param", BAD_UPLOADS)
def test_voice_upload_rejects_bad_input(servers: dict[str, ServerProcess], tmp_path: Path, name: str,
                                        seconds: float, filename: str, status: int, param: str) -> None:
    srv = servers["turbo"]
    path = tmp_path / "clip.wav"
    path.write_bytes(wav_bytes(reference_clip(seed=1, seconds=seconds)))
    assert_openai_error(upload_voice(srv, name, path, filename), status, param)
    assert not any(srv.voices_dir.glob("ok_name*"))


def test_voice_upload_rejects_non_audio_and_oversize(servers: dict[str, ServerProcess], tmp_path: Path) -> None:
    srv = servers["turbo"]
    junk = tmp_path / "junk.wav"
    junk.write_bytes(os.urandom(50_000))
    assert_openai_error(upload_voice(srv, "junk", junk), 400, "file")
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (10 * 1024 * 1024 + 10))
    assert upload_voice(srv, "big", big).status_code == 413
    no_file = httpx.post(f"{srv.url}/v1/audio/voices", data={"name": "x"})
    assert_openai_error(no_file, 400)


def test_errors_end_to_end(live: ServerProcess) -> None:
    url = f"{live.url}/v1/audio/speech"
    assert_openai_error(httpx.post(url, content=b"{oops", headers={"content-type": "application/json"}), 400)
    assert_openai_error(speak(live, input=""), 400, "input")
    assert_openai_error(speak(live, input="x" * 5000), 413, "input")
    assert_openai_error(speak(live, input="Hi.", voice="ghost"), 404, "voice")
    assert_openai_error(speak(live, input="Hi.", response_format="midi"), 400, "response_format")
    assert_openai_error(speak(live, input="Hi.", exaggeration=5), 422, "exaggeration")
    assert httpx.get(f"{live.url}/health").status_code == 200  # and the server is fine


def test_standard_cfg_weight_zero_works(servers: dict[str, ServerProcess]) -> None:
    # Upstream generate() crashes on cfg_weight=0 for the standard model.
    response = speak(servers["standard"], input="No guidance.", cfg_weight=0.0, seed=1)
    assert response.status_code == 200, response.text
    assert len(read_wav(response.content)[1]) > 0


def test_multilingual_languages(servers: dict[str, ServerProcess]) -> None:
    srv = servers["multilingual"]
    fr = speak(srv, input="Bonjour tout le monde.", language="fr", seed=1)
    assert fr.status_code == 200, fr.text
    zh = speak(srv, input="你好。今天天气很好！", language="zh", seed=1)
    assert zh.status_code == 200, zh.text
    assert_openai_error(speak(srv, input="Hello.", language="xx"), 400, "language")
    assert_openai_error(speak(servers["turbo"], input="Bonjour.", language="fr"), 400, "language")


def test_speed_changes_duration(servers: dict[str, ServerProcess]) -> None:
    srv = servers["turbo"]
    body = {"input": "Speed test sentence here.", "seed": 8, "response_format": "pcm"}
    normal, fast = len(speak(srv, **body).content), len(speak(srv, **body, speed=2.0).content)
    assert abs(fast / normal - 0.5) < 0.05


# ---------------------------------------------------------------------------
# Documentation agrees with the code
# ---------------------------------------------------------------------------


def test_readme_documents_every_setting_and_route() -> None:
    readme = (ROOT / "README.md").read_text()
    for f in dataclasses.fields(server.Settings):
        name, default = f.metadata["env"], f.default
        assert f"| `{name}` | `{default}` |" in readme or (default == "" and f"| `{name}` | (empty) |" in readme), name
    app = server.create_app(server.Settings(), ToneEngine())
    for route in app.routes:
        assert f"`{route.path}`" in readme, route.path
