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
import hashlib
import heapq
import io
import itertools
import json
import os
import re
import struct
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "numba"))

import numpy as np
import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

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
    tts_model: str = _env("TTS_MODEL", "turbo, standard or multilingual.", default="turbo")
    model_dir: str = _env("MODEL_DIR", "Local checkpoint directory (from_local layout); empty = Hugging Face hub.", default="")
    device: str = _env("DEVICE", "auto, cuda, mps or cpu.", default="auto")
    voices_dir: str = _env("VOICES_DIR", "Directory of reference clips for cloned voices.", default="voices")
    voice_cache_size: int = _env("VOICE_CACHE_SIZE", "Prepared voice conditionals kept in memory (LRU).", default=32)
    max_input_chars: int = _env("MAX_INPUT_CHARS", "Longest accepted `input`, in characters.", default=4096)
    chunk_max_chars: int = _env("CHUNK_MAX_CHARS", "Longest text handed to the model in one call.", default=250)
    log_level: str = _env("LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR.", default="INFO")

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
                values[f.name] = kind(raw)
            except ValueError:
                raise SystemExit(f"{f.metadata['env']}={raw!r} is not a valid {kind.__name__}") from None
        settings = cls(**values)
        if settings.tts_model not in MODEL_KINDS:
            raise SystemExit(f"TTS_MODEL={settings.tts_model!r}: choose one of {', '.join(MODEL_KINDS)}")
        if settings.device not in ("auto", "cuda", "mps", "cpu"):
            raise SystemExit(f"DEVICE={settings.device!r}: choose auto, cuda, mps or cpu")
        return settings


MODEL_KINDS = ("turbo", "standard", "multilingual")
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


def float_to_pcm16(audio: np.ndarray) -> bytes:
    """float32 in [-1, 1] to signed 16-bit little-endian PCM bytes."""
    clipped = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    return np.round(clipped * 32767.0).astype("<i2").tobytes()


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
    """

    def __init__(self, overlap: int):
        self.overlap = overlap
        self._tail = np.zeros(0, dtype=np.float32)

    def push(self, piece: np.ndarray, starts_segment: bool) -> np.ndarray:
        piece = np.asarray(piece, dtype=np.float32)
        n = min(len(self._tail), len(piece)) if starts_segment else 0
        if n:
            fade_out, fade_in = fade_curves(n)
            blend = self._tail[len(self._tail) - n :] * fade_out + piece[:n] * fade_in
            audio = np.concatenate([self._tail[: len(self._tail) - n], blend, piece[n:]])
        else:
            audio = np.concatenate([self._tail, piece])
        keep = min(self.overlap, len(audio))
        ready, self._tail = audio[: len(audio) - keep], audio[len(audio) - keep :]
        return ready

    def finish(self) -> np.ndarray:
        tail, self._tail = self._tail, np.zeros(0, dtype=np.float32)
        return tail


def change_speed(audio: np.ndarray, speed: float) -> np.ndarray:
    """Change tempo without changing pitch."""
    if speed == 1.0 or len(audio) < 2048:
        return audio
    import librosa

    return librosa.effects.time_stretch(audio.astype(np.float32), rate=speed).astype(np.float32)


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


# ---------------------------------------------------------------------------
# 4. Engines
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthesisParams:
    exaggeration: float = 0.5
    cfg_weight: float = 0.5
    temperature: float = 0.8
    language: str | None = None


@dataclass(frozen=True)
class VoiceRef:
    """A voice as the request named it, resolved to a clip (None = the built-in voice)."""

    name: str
    path: Path | None
    digest: str  # content hash of the clip, "builtin" for the checkpoint's own voice


class Engine(ABC):
    """What the scheduler and transports know of a TTS model. Runs only on the inference thread."""

    name: str
    sample_rate: int

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def warm_up(self) -> None: ...

    @abstractmethod
    def prepare_voice(self, clip: np.ndarray | None, sample_rate: int, exaggeration: float) -> Any:
        """Conditionals for one voice; clip=None is the built-in voice."""

    @abstractmethod
    def synthesize(self, text: str, voice: Any, params: SynthesisParams) -> Iterator[np.ndarray]:
        """Audio for one chunk of text, float32 mono at `sample_rate`, as it is produced."""

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


MULTILINGUAL_LANGUAGES = (
    "ar da de el en es fi fr he hi it ja ko ms nl no pl pt ru sv sw tr zh".split()
)


class ChatterboxEngine(Engine):
    """Chatterbox Turbo, standard or Multilingual; voice conditionals travel with each request."""

    def __init__(self, kind: str, model_dir: str, device: str):
        self.kind = kind
        self.name = f"chatterbox-{kind}"
        self.sample_rate = NATIVE_SAMPLE_RATE
        self.model_dir = model_dir
        self.device = pick_device(device)
        self.parts: ChatterboxParts | None = None
        self.checkpoint = ""

    # Reference clip lengths upstream feeds to each part (seconds).
    ENC_COND_SECONDS = {"turbo": 15, "standard": 6, "multilingual": 6}
    DEC_COND_SECONDS = 10

    def load(self) -> None:
        ckpt_dir = Path(self.model_dir) if self.model_dir else self._download()
        self.checkpoint = str(ckpt_dir)
        self.parts = load_chatterbox(self.kind, ckpt_dir, self.device)

    def _download(self) -> Path:
        from huggingface_hub import snapshot_download

        logger.info("downloading {} from the Hugging Face hub (cached after the first time)", HUB_REPOS[self.kind])
        return Path(snapshot_download(repo_id=HUB_REPOS[self.kind], allow_patterns=HUB_PATTERNS[self.kind],
                                      token=os.getenv("HF_TOKEN") or None))

    def warm_up(self) -> None:
        voice = self.prepare_voice(None, self.sample_rate, 0.5)
        for _ in self.synthesize("Warm up.", voice, SynthesisParams(), max_tokens=10):
            pass

    def prepare_voice(self, clip: np.ndarray | None, sample_rate: int, exaggeration: float) -> Any:
        from chatterbox.models.s3tokenizer import S3_SR
        from chatterbox.models.t3.modules.cond_enc import T3Cond
        from chatterbox.tts import Conditionals

        parts = self._parts()
        if clip is None:
            if parts.builtin is None:
                raise RuntimeError("this checkpoint has no built-in voice (conds.pt)")
            base = parts.builtin
            t3 = T3Cond(speaker_emb=base.t3.speaker_emb, cond_prompt_speech_tokens=base.t3.cond_prompt_speech_tokens,
                        emotion_adv=exaggeration * torch.ones(1, 1, 1)).to(device=self.device)
            return Conditionals(t3, dict(base.gen))
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
        import torch.nn.functional as F
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
        parts = self._parts()
        budget = max_tokens or speech_token_budget(text)
        with torch.inference_mode():
            text_tokens = self._text_tokens(text, params.language)
            t3_cond = _copy_t3_cond(voice.t3)  # stock T3 caches embeddings on the cond object
            if self.kind == "turbo":
                tokens = parts.t3.inference_turbo(t3_cond=t3_cond, text_tokens=text_tokens,
                                                  temperature=params.temperature, max_gen_len=budget - 1)
            else:
                tokens = parts.t3.inference(t3_cond=t3_cond, text_tokens=text_tokens, max_new_tokens=budget,
                                            temperature=params.temperature, cfg_weight=params.cfg_weight)
            tokens = tokens[0]
            tokens = tokens[tokens < SPEECH_CODEBOOK]
            if self.kind == "turbo":
                from chatterbox.models.s3gen.const import S3GEN_SIL

                tokens = torch.cat([tokens, torch.full((3,), S3GEN_SIL, dtype=tokens.dtype, device=tokens.device)])
            if len(tokens) == 0:
                return
            wav, _ = parts.s3gen.inference(speech_tokens=tokens, ref_dict=dict(voice.gen),
                                           n_cfm_timesteps=2 if self.kind == "turbo" else None)
        yield wav.squeeze(0).float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"engine": "chatterbox", "model": self.kind, "device": self.device, "checkpoint": self.checkpoint,
                "sample_rate": self.sample_rate,
                "languages": list(MULTILINGUAL_LANGUAGES) if self.kind == "multilingual" else ["en"]}


def _copy_t3_cond(cond: Any) -> Any:
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    return T3Cond(speaker_emb=cond.speaker_emb, cond_prompt_speech_tokens=cond.cond_prompt_speech_tokens,
                  emotion_adv=cond.emotion_adv)


def normalize_loudness(audio: np.ndarray, sample_rate: int, target_lufs: float) -> np.ndarray:
    import pyloudnorm

    loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(audio)
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    return (audio * gain).astype(np.float32) if np.isfinite(gain) and gain > 0 else audio


# --- Voices -----------------------------------------------------------------

OPENAI_VOICES = frozenset("alloy ash ballad coral echo fable onyx nova sage shimmer verse marin cedar".split())
VOICE_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg")
VOICE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
VOICE_MAX_BYTES = 10 * 1024 * 1024
VOICE_MIN_SECONDS, VOICE_MAX_SECONDS = 5.0, 30.0


class VoiceLibrary:
    """Reference clips on disk in VOICES_DIR, one file per voice: NAME.wav|mp3|flac|ogg."""

    def __init__(self, directory: Path):
        self.directory = directory

    def _files(self, name: str) -> list[Path]:
        if not VOICE_NAME.match(name):
            return []
        return [p for ext in VOICE_EXTENSIONS if (p := self.directory / f"{name}{ext}").is_file()]

    def resolve(self, name: str) -> VoiceRef | None:
        files = self._files(name)
        if files:
            return VoiceRef(name, files[0], hashlib.sha256(files[0].read_bytes()).hexdigest())
        if name == "default" or name in OPENAI_VOICES:
            return VoiceRef(name, None, "builtin")
        return None

    def list(self) -> list[dict[str, Any]]:
        uploaded = sorted({p.stem for p in self.directory.glob("*") if p.suffix in VOICE_EXTENSIONS
                           and VOICE_NAME.match(p.stem)}) if self.directory.is_dir() else []
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
    REALTIME = 0
    FILE = 1
    BACKGROUND = 2


@dataclass(order=True)
class _WorkItem:
    priority: int
    seq: int
    fn: Callable[[], Any] = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)


class InferenceWorker:
    """The one thread that touches the model. Async callers submit short units of work."""

    def __init__(self) -> None:
        self._heap: list[_WorkItem] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._stopping = False
        self._thread.start()

    async def run(self, fn: Callable[[], Any], priority: int = Priority.FILE) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            heapq.heappush(self._heap, _WorkItem(priority, next(self._seq), fn, future, loop))
            self._cond.notify()
        return await future

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=5)

    @property
    def depth(self) -> int:
        return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                item = heapq.heappop(self._heap)
            if item.future.cancelled():
                continue
            try:
                result, error = item.fn(), None
            except BaseException as exc:  # delivered to the awaiting request
                result, error = None, exc
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


@dataclass
class SpeechJob:
    """Everything needed to speak one request, validated."""

    text: str
    voice: VoiceRef
    params: SynthesisParams
    speed: float = 1.0
    seed: int | None = None
    priority: int = Priority.FILE


class Speaker:
    """Owns the engine, voices and worker; turns a SpeechJob into a stream of audio."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.voices = VoiceLibrary(Path(settings.voices_dir))
        self.voice_cache = VoiceCache(settings.voice_cache_size)
        self.worker = InferenceWorker()
        self.ready = False

    def start(self) -> None:
        t0 = time.perf_counter()
        self.engine.load()
        t1 = time.perf_counter()
        self.engine.warm_up()
        t2 = time.perf_counter()
        self.ready = True
        logger.info("model {} ready on {}: load {:.1f}s, warm-up {:.1f}s", self.engine.name,
                    self.engine.describe().get("device"), t1 - t0, t2 - t1)

    def _conditionals(self, voice: VoiceRef, exaggeration: float) -> Any:
        def make() -> Any:
            if voice.path is None:
                return self.engine.prepare_voice(None, self.engine.sample_rate, exaggeration)
            clip, rate = decode_audio(voice.path.read_bytes())
            return self.engine.prepare_voice(clip, rate, exaggeration)

        return self.voice_cache.get((voice.digest, exaggeration), make)

    async def stream(self, job: SpeechJob) -> AsyncIterator[np.ndarray]:
        """Audio of the whole job at the engine's rate, chunk by chunk, joined without clicks."""
        worker, engine = self.worker, self.engine
        conds = await worker.run(lambda: self._conditionals(job.voice, job.params.exaggeration), job.priority)
        seed = job.seed if job.seed is not None else int.from_bytes(os.urandom(4), "little")
        rng = RngStream(seed)
        joiner = ChunkJoiner(int(JOIN_CROSSFADE_SECONDS * engine.sample_rate))

        def step(pieces: Iterator[np.ndarray]) -> np.ndarray | None:
            with rng.active():
                return next(pieces, None)

        for chunk in text_chunks(job.text, self.settings.chunk_max_chars):
            pieces = engine.synthesize(chunk, conds, job.params)
            starts_segment = True
            while (piece := await worker.run(lambda: step(pieces), job.priority)) is not None:
                ready = joiner.push(change_speed(piece, job.speed), starts_segment)
                starts_segment = False
                if len(ready):
                    yield ready
        tail = joiner.finish()
        if len(tail):
            yield tail


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


class SpeechRequest(BaseModel):
    """POST /v1/audio/speech. Unknown fields are ignored, as OpenAI clients send extras."""

    model_config = ConfigDict(extra="ignore")

    model: str = "tts-1"
    input: str
    voice: str | VoiceObject = "default"
    response_format: str = "wav"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    exaggeration: float = Field(0.5, ge=0.25, le=2.0)
    cfg_weight: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(0.8, ge=0.05, le=5.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    language: str | None = None

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceObject) else self.voice


RESPONSE_FORMATS = {"wav": "audio/wav", "pcm": "audio/pcm"}


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    body = await read_body(request, max_bytes)
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
    """Validate; a missing or wrongly shaped field is a 400, a value out of range a 422."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or None
        status = 400 if err["type"] in ("missing", "string_type", "model_type") else 422
        raise ApiError(status, f"Invalid value for '{param}': {err['msg']}", param=param,
                       code="missing_field" if err["type"] == "missing" else "invalid_value") from None


def speech_job(req: SpeechRequest, app_state: AppState, priority: int) -> SpeechJob:
    settings = app_state.settings
    text = req.input.strip()
    if not text or not split_sentences(text):
        raise ApiError(400, "'input' is empty: give some text to speak.", param="input", code="empty_input")
    if len(req.input) > settings.max_input_chars:
        raise ApiError(413, f"'input' is {len(req.input)} characters; the limit is {settings.max_input_chars}.",
                       param="input", code="input_too_long")
    if req.response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"Unsupported response_format {req.response_format!r}; "
                       f"choose one of {', '.join(RESPONSE_FORMATS)}.", param="response_format",
                       code="unsupported_format")
    languages = app_state.engine.describe().get("languages", ["en"])
    language = (req.language or "en").lower()
    if language not in languages:
        raise ApiError(400, f"Unsupported language {req.language!r} for {app_state.engine.name}; "
                       f"supported: {', '.join(languages)}.", param="language", code="unsupported_language")
    voice = app_state.speaker.voices.resolve(req.voice_name)
    if voice is None:
        raise ApiError(404, f"Voice {req.voice_name!r} not found; GET /v1/audio/voices lists the voices.",
                       param="voice", code="voice_not_found")
    params = SynthesisParams(exaggeration=req.exaggeration, cfg_weight=req.cfg_weight,
                             temperature=req.temperature, language=language)
    return SpeechJob(text=text, voice=voice, params=params, speed=req.speed, seed=req.seed, priority=priority)


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    speaker: Speaker
    started: float = field(default_factory=time.time)


def state(request: Request) -> AppState:
    return request.app.state.tts


def require_ready(app_state: AppState) -> None:
    if not app_state.speaker.ready:
        raise ApiError(503, "The model is still loading; retry shortly.", type="server_error",
                       code="model_loading", headers={"Retry-After": "5"})


MAX_JSON_BYTES = 1024 * 1024


async def speech(request: Request) -> Response:
    app_state = state(request)
    req = parse_model(SpeechRequest, await read_json(request, MAX_JSON_BYTES))
    job = speech_job(req, app_state, Priority.FILE)
    require_ready(app_state)
    pieces = [piece async for piece in app_state.speaker.stream(job)]
    audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    pcm = float_to_pcm16(resample(audio, app_state.engine.sample_rate, NATIVE_SAMPLE_RATE))
    if req.response_format == "wav":
        pcm = wav_header(NATIVE_SAMPLE_RATE, len(pcm) // 2) + pcm
    return Response(pcm, media_type=RESPONSE_FORMATS[req.response_format])


async def list_voices(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": state(request).speaker.voices.list()})


async def upload_voice(request: Request) -> Response:
    app_state = state(request)
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


async def list_models(request: Request) -> Response:
    app_state = state(request)
    model = {"id": app_state.engine.name, "object": "model", "created": int(app_state.started),
             "owned_by": "resemble-ai"}
    return JSONResponse({"object": "list", "data": [model]})


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


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    logger.opt(exception=exc).error("unhandled error on {} {}", request.method, request.url.path)
    return error_response(500, "Internal server error; the server log has details.", type="server_error",
                          code="internal_error")


# ---------------------------------------------------------------------------
# 8. App
# ---------------------------------------------------------------------------


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    engine = engine or ChatterboxEngine(settings.tts_model, settings.model_dir, settings.device)
    speaker = Speaker(settings, engine)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loading = asyncio.ensure_future(speaker.worker.run(speaker.start, Priority.REALTIME))
        loading.add_done_callback(_report_load_failure)
        yield
        loading.cancel()
        speaker.worker.stop()

    app = Starlette(
        routes=[
            Route("/v1/audio/speech", speech, methods=["POST"]),
            Route("/v1/audio/voices", list_voices, methods=["GET"]),
            Route("/v1/audio/voices", upload_voice, methods=["POST"]),
            Route("/v1/audio/voices/{name}", delete_voice, methods=["DELETE"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
        ],
        exception_handlers={ApiError: api_error_handler, HTTPException: http_error_handler,
                            Exception: unexpected_error_handler},
        lifespan=lifespan,
    )
    app.state.tts = AppState(settings=settings, engine=engine, speaker=speaker)
    return app


def _report_load_failure(task: asyncio.Future[Any]) -> None:
    if task.cancelled() or task.exception() is None:
        return
    logger.opt(exception=task.exception()).critical("model failed to load; exiting")
    os._exit(3)  # a server that can never become ready must not linger half-alive


def configure_logging(level: str) -> None:
    logger.remove()
    logger.add(sys.stderr, level=level.upper(), diagnose=False,
               format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}")


def main() -> None:
    import uvicorn

    settings = Settings.from_env()
    configure_logging(settings.log_level)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                ws_max_size=1024 * 1024)


if __name__ == "__main__":
    main()
