"""Other vendors' speech protocols, each a thin adapter over server.py's pipeline, plugged into the
server as one add-on (`protocol()`; PROTOCOLS names this module by default).

  ElevenLabs  REST  POST /v1/text-to-speech/{voice_id}[/stream][/with-timestamps];
                    GET /v1/voices, /v2/voices, /v1/voices/{voice_id}
              WS    /v1/text-to-speech/{voice_id}/stream-input, .../multi-stream-input
  Cartesia    WS    /tts/websocket; REST POST /tts/bytes, /tts/sse; GET /voices, /voices/{voice_id}
  Wyoming     TCP   on WYOMING_PORT (Home Assistant)
  Asterisk    TCP   AudioSocket on AUDIOSOCKET_PORT; WS /v1/telephony/asterisk (chan_websocket);
              REST  POST /v1/telephony/audiosocket/{uuid}: what a call is to say
  Twilio      WS    /v1/telephony/twilio (Media Streams)

Every utterance is a server.SpeechSession utterance (or an HTTP request's job) rendered by
Speaker.render, so it is scheduled, limited, cancelled, logged and counted exactly as the server's
own protocols are; an adapter only translates messages, formats, errors and API keys.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from loguru import logger
from pydantic import Field, field_validator, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketState
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error as WyomingError
from wyoming.event import Event, async_write_event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler, AsyncTcpServer
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

import server
from server import (
    ApiError,
    AppState,
    CharTime,
    NullIsDefault,
    Priority,
    ProtocolPlugin,
    SpeechJob,
    SpeechSession,
    SynthesisFields,
    Utterance,
    Words,
    with_timings,
)

# --- Shared: API keys, errors, character timings ----------------------------------------------


def check_key(app_state: AppState, *presented: str | None) -> None:
    """API_KEY, presented the protocol's own way (any of `presented`)."""
    key = app_state.settings.api_key
    if key and not any(token and server.key_matches(token, key) for token in presented):
        raise ApiError(401, "Missing or invalid API key.", code="invalid_api_key")


def is_speaking(utterance: Utterance) -> bool:
    """The utterance is being spoken for text its client gave: started, and its text complete or not all
    taken by the model yet. One that only waits for more text (an empty context) is not."""
    started = utterance.task is not None and not utterance.task.done()
    return started and (utterance.ended or utterance.chunks is not None or utterance.queued_chars > 0)


class IdleAwareSession(SpeechSession):
    """A session that closes a client gone quiet, and so tells a connection that only waits (for text, for an
    event) from one whose speech is still being made or sent."""

    sounded_at = -math.inf  # when its last audio left

    def sounded(self) -> None:
        self.sounded_at = time.monotonic()

    def sounding(self, window: float) -> bool:
        """Audio is being made or sent for text received: an utterance is speaking, or audio left within the
        last `window` seconds (the model's current chunk, its text all taken)."""
        recent = time.monotonic() - self.sounded_at < window
        return recent or any(is_speaking(utterance) for utterance in self.active.values())


class VendorSession(IdleAwareSession):
    """A WebSocket whose utterances ("contexts") are named by the client and may be spoken side by
    side; subclasses say how messages, audio and endings look in their protocol."""

    async def stream(self, utterance: Utterance) -> None:
        async for data, original, normalized, start in with_timings(utterance.audio(), utterance.job):
            self.sounded()
            await self.send_audio(utterance, data, original, normalized, start)

    async def send_audio(
        self, context: Utterance, data: bytes, original: list[CharTime], normalized: list[CharTime], start: float
    ) -> None:
        """One piece of the context's audio, with the characters that start in it, of the caller's text
        and of the normalized (times from the utterance's start; `start` is where this piece begins)."""
        raise NotImplementedError

    async def hang_up(self, code: int = 1000, reason: str = "") -> None:
        """End the session from the server's side."""
        self.closing, self.close_code = True, code
        if WebSocketState.CONNECTED == self.websocket.client_state == self.websocket.application_state:
            await self.websocket.close(code, reason[:120])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def vendor_route(
    path: str,
    endpoint: Callable[[Request], Awaitable[Response]],
    error: Callable[[ApiError], Response],
    method: str = "POST",
) -> Route:
    """An HTTP route that answers errors in its protocol's shape."""

    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as exc:
            response = error(exc)
            response.headers.update(exc.headers)
            return response

    return Route(path, answer, methods=[method])


async def speak_http(
    request: Request,
    fields: SynthesisFields,
    text: str,
    streaming: bool,
    param: str,
    convert: Callable[[bytes], bytes] | None = None,
) -> Response:
    """A vendor HTTP request's audio: the same job and stream as POST /v1/audio/speech."""
    job, chunks = await server.request_job(request, fields, text, "mp3", streaming, param=param)
    audio = await server.speech_stream(request, job, chunks, streaming)
    if convert is not None:
        audio = converted(audio, convert)
    return StreamingResponse(
        server.ended_cleanly(audio), media_type=job.output.fmt.media_type, headers=server.audio_headers(job)
    )


async def converted(audio: AsyncIterator[bytes], convert: Callable[[bytes], bytes]) -> AsyncIterator[bytes]:
    async for data in audio:
        yield convert(data)


def s16_to_f32(data: bytes) -> bytes:
    return (np.frombuffer(data, "<i2").astype("<f4") / 32768.0).tobytes()


def query_int(params: Any, name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw in (None, ""):
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, f"'{name}' must be a whole number from {low} to {high}.", param=name, code="invalid_value")
    return int(raw)


def query_bool(params: Any, name: str) -> bool:
    raw = params.get(name)
    if raw in (None, ""):
        return False
    try:
        return server.parse_bool(raw)
    except ValueError:
        raise ApiError(400, f"'{name}' must be true or false.", param=name, code="invalid_value") from None


LANGUAGE_NAMES = {
    "ar": "Arabic", "da": "Danish", "de": "German", "el": "Greek", "en": "English", "es": "Spanish",
    "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi", "it": "Italian", "ja": "Japanese",
    "ko": "Korean", "ms": "Malay", "nl": "Dutch", "no": "Norwegian", "pl": "Polish", "pt": "Portuguese",
    "ru": "Russian", "sv": "Swedish", "sw": "Swahili", "tr": "Turkish", "zh": "Chinese",
}  # fmt: skip


def base_language(code: str) -> str:
    return code.replace("_", "-").split("-")[0].lower()


@dataclass(frozen=True)
class VoiceInfo:
    """One of the server's voices as a person choosing it reads it (the vendors' voice lists)."""

    id: str
    name: str  # the id, capitalized
    kind: str  # builtin, alias or uploaded (server.VoiceLibrary.list)
    what: str  # what the voice is, in a few words
    languages: list[str]

    @property
    def language(self) -> str:
        """The first language's ISO 639-1 code ("en" of "en_US"), as the vendors' voice lists give it."""
        return base_language(self.languages[0]) if self.languages else "en"

    @property
    def language_names(self) -> str:
        names = [LANGUAGE_NAMES.get(base_language(code), code) for code in self.languages]
        return ", ".join(names) if len(names) <= 3 else f"{len(names)} languages"

    @property
    def description(self) -> str:
        return f"{self.name}: {self.what} ({self.language_names})"


def voice_catalog(app_state: AppState) -> list[VoiceInfo]:
    """The server's voices (server.VoiceLibrary.list) with their names, languages and what each is. It lists a
    directory: off the event loop."""
    engine = app_state.engine
    languages = list(engine.describe().get("languages") or ["en"])
    model = "Piper" if engine.name == "piper" else "Chatterbox"
    found = []
    for voice in app_state.speaker.voices.list():
        kind = voice["type"]
        if kind == "builtin":
            what = f"{model}'s built-in voice"
        elif kind == "alias":
            what = f"OpenAI's voice name, spoken in {model}'s built-in voice"
        elif engine.clones_voices:
            what = "a voice cloned from an uploaded clip"
        else:
            what = f"a {model} voice model from the voices folder"
        found.append(VoiceInfo(voice["id"], voice["id"][:1].upper() + voice["id"][1:], kind, what, languages))
    return found


def voice_info(app_state: AppState, voice_id: str) -> VoiceInfo | None:
    return next((voice for voice in voice_catalog(app_state) if voice.id == voice_id), None)


# --- ElevenLabs --------------------------------------------------------------------------------

ELEVENLABS_FORMAT = "mp3_44100_128"


class ElevenLabsVoiceSettings(NullIsDefault):
    """Accepted and range-checked; only `speed` changes the speech (ElevenLabs' stability,
    similarity and style have no Chatterbox or Piper counterpart)."""

    stability: float | None = Field(None, ge=0.0, le=1.0)
    similarity_boost: float | None = Field(None, ge=0.0, le=1.0)
    style: float | None = Field(None, ge=0.0, le=1.0)
    use_speaker_boost: bool | None = None
    speed: float | None = Field(None, ge=0.25, le=4.0)


class ElevenLabsGeneration(NullIsDefault):
    # Accepted and validated; text is spoken as its sentences complete (or on flush), not by length.
    chunk_length_schedule: list[Annotated[int, Field(ge=50, le=500)]] | None = Field(None, min_length=1)


class ElevenLabsSpeech(NullIsDefault):
    text: str
    model_id: str | None = None
    voice_settings: ElevenLabsVoiceSettings | None = None
    language_code: str | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    apply_text_normalization: Literal["auto", "on", "off"] = "auto"
    pronunciation_dictionary_locators: list[Any] | None = Field(None, max_length=3)  # accepted: stored on ElevenLabs


class ElevenLabsMessage(NullIsDefault):
    text: str | None = None
    context_id: str = Field("default", min_length=1, max_length=128)
    voice_settings: ElevenLabsVoiceSettings | None = None
    generation_config: ElevenLabsGeneration | None = None
    try_trigger_generation: bool = False  # accepted; sentences trigger generation here
    flush: bool = False
    close_context: bool = False
    close_socket: bool = False
    xi_api_key: str | None = None
    authorization: str | None = None


def elevenlabs_fields(
    voice_id: str,
    output_format: str,
    settings: ElevenLabsVoiceSettings | None,
    language: str | None = None,
    seed: int | None = None,
    normalization: str = "auto",
) -> SynthesisFields:
    speed = settings.speed if settings is not None else None
    fields = {"voice": voice_id, "output_format": output_format, "speed": speed, "language": language, "seed": seed}
    return server.parse_model(SynthesisFields, fields | {"text_normalization": normalization})


ELEVENLABS_STATUS = {"invalid_value": 422, "missing_field": 422, "voice_not_found": 404}


def elevenlabs_error(exc: ApiError) -> JSONResponse:
    """ElevenLabs' REST error shape: {"detail": {"status", "message"}}."""
    return JSONResponse(
        {"detail": {"status": exc.code or "invalid_request", "message": exc.message}},
        status_code=ELEVENLABS_STATUS.get(exc.code or "", exc.status),
    )


async def elevenlabs_request(request: Request) -> tuple[ElevenLabsSpeech, SynthesisFields]:
    app_state = server.state(request)
    check_key(app_state, request.headers.get("xi-api-key"), server.bearer_token(request.headers))
    data = await server.read_json(request, server.MAX_JSON_BYTES)
    body: ElevenLabsSpeech = server.parse_model(ElevenLabsSpeech, data)
    output_format = request.query_params.get("output_format") or ELEVENLABS_FORMAT
    fields = elevenlabs_fields(
        request.path_params["voice_id"],
        output_format,
        body.voice_settings,
        body.language_code,
        body.seed,
        body.apply_text_normalization,
    )
    return body, fields


async def elevenlabs_speech(request: Request) -> Response:
    """POST /v1/text-to-speech/{voice_id}: whole-chunk decoding; /stream: token windows."""
    body, fields = await elevenlabs_request(request)
    return await speak_http(request, fields, body.text, streaming=request.url.path.endswith("/stream"), param="text")


async def elevenlabs_timestamps(request: Request) -> Response:
    """.../with-timestamps: base64 audio with the timings of the text's characters (and of the normalized
    text's), as ElevenLabs answers: /stream/with-timestamps as JSON lines, one per piece of audio; plain
    /with-timestamps as one JSON object once all of it is made."""
    body, fields = await elevenlabs_request(request)
    streaming = "/stream/" in request.url.path
    job, chunks = await server.request_job(request, fields, body.text, "mp3", streaming, param="text")
    audio = await server.speech_stream(request, job, chunks, streaming)
    if not streaming:
        pieces = [piece async for piece in with_timings(audio, job)]
        whole = (
            b"".join(data for data, _, _, _ in pieces),
            [char for _, original, _, _ in pieces for char in original],
            [char for _, _, normalized, _ in pieces for char in normalized],
        )
        return Response(timestamp_json(*whole), media_type="application/json", headers={"X-Request-Id": job.id})

    async def lines() -> AsyncIterator[bytes]:
        async for data, original, normalized, _ in with_timings(audio, job):
            yield timestamp_json(data, original, normalized) + b"\n"

    return StreamingResponse(
        server.ended_cleanly(lines()), media_type="application/x-ndjson", headers={"X-Request-Id": job.id}
    )


def timestamp_json(data: bytes, original: list[CharTime], normalized: list[CharTime]) -> bytes:
    answer = {
        "audio_base64": b64(data),
        "alignment": server.seconds_alignment(original),
        "normalized_alignment": server.seconds_alignment(normalized),
    }
    return json.dumps(answer, separators=(",", ":")).encode()


def elevenlabs_alignment(chars: list[CharTime], start: float) -> dict[str, Any]:
    """Character timings in milliseconds from the start of this message's audio (as ElevenLabs sends
    them); the duration under both spellings clients read."""
    durations = [round(1000 * (c.end - max(c.start, start))) for c in chars]
    return {
        "chars": [c.char for c in chars],
        "charStartTimesMs": [round(1000 * max(0.0, c.start - start)) for c in chars],
        "charsDurationsMs": durations,
        "charDurationsMs": durations,
    }


ELEVENLABS_CATEGORIES = {"builtin": "premade", "alias": "premade", "uploaded": "cloned"}
# voice_type as ElevenLabs filters it: which of our voices' categories each takes.
ELEVENLABS_VOICE_TYPES = {
    "default": {"premade"},
    "personal": {"cloned"},
    "workspace": {"cloned"},
    "non-default": {"cloned"},
    "non-community": {"cloned"},
    "saved": {"premade", "cloned"},
    "community": set(),
}


def elevenlabs_voice(voice: VoiceInfo) -> dict[str, Any]:
    """A voice in ElevenLabs' shape (its `Voice`): what its SDK's voice listings and lookups read."""
    language = voice.language
    return {
        "voice_id": voice.id,
        "name": voice.name,
        "category": ELEVENLABS_CATEGORIES.get(voice.kind, "premade"),
        "description": voice.description,
        "labels": {"language": language, "description": voice.what},
        "samples": None,
        "fine_tuning": None,
        "preview_url": None,
        "available_for_tiers": [],
        "settings": None,
        "sharing": None,
        "high_quality_base_model_ids": [],
        "verified_languages": [
            {"language": base_language(code), "locale": code, "model_id": "", "accent": None}
            for code in voice.languages
        ],
        "is_owner": voice.kind == "uploaded",
        "is_legacy": False,
    }


def elevenlabs_key(request: Request) -> None:
    check_key(server.state(request), request.headers.get("xi-api-key"), server.bearer_token(request.headers))


async def elevenlabs_voices(request: Request) -> Response:
    """GET /v1/voices: every voice ({"voices": [...]}, ElevenLabs' GetVoicesResponse)."""
    elevenlabs_key(request)
    catalog = await asyncio.to_thread(voice_catalog, server.state(request))
    return JSONResponse({"voices": [elevenlabs_voice(v) for v in catalog]})


async def elevenlabs_voices_v2(request: Request) -> Response:
    """GET /v2/voices: search (name, description, labels, category), category and voice_type filters,
    voice_ids, sort by name, pages of page_size (1-100, default 10) with next_page_token, has_more and
    total_count. The other filters (gender, age, accent, ...) describe ElevenLabs' library: accepted, and
    every voice here matches them."""
    elevenlabs_key(request)
    params = request.query_params
    page_size = query_int(params, "page_size", 10, 1, 100)
    token = params.get("next_page_token") or "0"
    if not token.isdigit():
        raise ApiError(
            400, "'next_page_token' is not one this server gave.", param="next_page_token", code="invalid_value"
        )
    sort_direction = params.get("sort_direction") or "asc"
    if sort_direction not in ("asc", "desc"):
        raise ApiError(400, "'sort_direction' must be 'asc' or 'desc'.", param="sort_direction", code="invalid_value")
    voice_type = params.get("voice_type")
    if voice_type and voice_type not in ELEVENLABS_VOICE_TYPES:
        raise ApiError(
            400,
            f"'voice_type' must be one of {', '.join(ELEVENLABS_VOICE_TYPES)}.",
            param="voice_type",
            code="invalid_value",
        )
    voices = [elevenlabs_voice(v) for v in await asyncio.to_thread(voice_catalog, server.state(request))]
    if search := (params.get("search") or "").strip().lower():
        voices = [
            v
            for v in voices
            if search in " ".join([v["name"], v["description"], v["category"], *v["labels"].values()]).lower()
        ]
    if category := params.get("category"):
        voices = [v for v in voices if v["category"] == category]
    if voice_type:
        voices = [v for v in voices if v["category"] in ELEVENLABS_VOICE_TYPES[voice_type]]
    if ids := params.getlist("voice_ids"):
        wanted = {i for raw in ids for i in raw.split(",") if i}
        voices = [v for v in voices if v["voice_id"] in wanted]
    if params.get("sort") == "name" or sort_direction == "desc":
        voices.sort(key=lambda v: v["name"].lower(), reverse=sort_direction == "desc")
    start = int(token)
    page = voices[start : start + page_size]
    more = start + page_size < len(voices)
    return JSONResponse(
        {
            "voices": page,
            "has_more": more,
            "total_count": len(voices),
            "next_page_token": str(start + page_size) if more else None,
        }
    )


async def elevenlabs_voice_by_id(request: Request) -> Response:
    """GET /v1/voices/{voice_id}: one voice, or 404 voice_not_found."""
    elevenlabs_key(request)
    voice_id = request.path_params["voice_id"]
    voice = await asyncio.to_thread(voice_info, server.state(request), voice_id)
    if voice is None:
        raise ApiError(404, f"A voice with the voice_id {voice_id!r} was not found.", code="voice_not_found")
    return JSONResponse(elevenlabs_voice(voice))


@dataclass
class ElevenLabsContext(Utterance):
    """A context: its last_input is the last message naming it (an empty text keeps it alive), and
    inactivity_timeout, not INPUT_TIMEOUT, bounds its wait for text (close_idle_contexts)."""

    input_timeout: float = math.inf


class ElevenLabsSession(VendorSession):
    """stream-input: one utterance per socket, its text arriving in pieces; `{"text": ""}` ends it,
    and the socket closes after `{"isFinal": true}`."""

    multi = False
    utterance_type = ElevenLabsContext

    def __init__(self, websocket: WebSocket, app_state: AppState):
        super().__init__(websocket, app_state)
        self.opened = False  # a context was ever opened (stream-input has one)
        self.authorized = False
        self.closing_socket = False  # close_socket: close once every context has finished

    async def read_messages(self) -> None:
        query = self.websocket.query_params
        try:
            self.output_format = query.get("output_format") or ELEVENLABS_FORMAT
            self.auto_mode = query_bool(query, "auto_mode")
            self.language = query.get("language_code") or None
            self.normalization = query.get("apply_text_normalization") or "auto"
            if self.normalization not in ("auto", "on", "off"):
                raise ApiError(
                    400,
                    "'apply_text_normalization' must be auto, on or off.",
                    param="apply_text_normalization",
                    code="invalid_value",
                )
            self.inactivity = query_int(query, "inactivity_timeout", 20, 1, 180)
            server.output_spec(SynthesisFields(output_format=self.output_format), "mp3")
        except ApiError as exc:
            await self.send_error(exc, None)
            await self.hang_up(1008, exc.message)
            return
        while not self.closing:
            try:
                message = await server.within(self.inactivity, self.websocket.receive())
            except TimeoutError:
                if self.sounding(self.inactivity):
                    await self.close_idle_contexts()
                    continue  # speech being made or sent is activity; a context that only waits for text is not
                await self.send_error(
                    ApiError(
                        408, f"No message for {self.inactivity} s (inactivity_timeout).", code="input_timeout_exceeded"
                    ),
                    None,
                )
                await self.hang_up(1008, "input_timeout_exceeded")
                return
            if message["type"] == "websocket.disconnect":
                return
            await self.receive(message.get("text"), message.get("bytes"))
            await self.close_idle_contexts()

    async def close_idle_contexts(self) -> None:
        """On multi-stream-input, inactivity_timeout is each context's too: one with no message for it and
        nothing being spoken is closed as close_context closes it (what it buffered is spoken, then isFinal)."""
        now = time.monotonic()
        for context in list(self.active.values()):
            idle = now - context.last_input >= self.inactivity
            if self.multi and idle and not is_speaking(context):
                await context.end()

    async def receive(self, text: str | None, data: bytes | None) -> None:
        context_id = None
        try:
            message: ElevenLabsMessage = server.parse_model(ElevenLabsMessage, server.ws_message(text))
            context_id = message.context_id
            if not self.authorized:
                check_key(
                    self.app_state,
                    self.websocket.headers.get("xi-api-key"),
                    server.bearer_token(self.websocket.headers),
                    message.xi_api_key,
                    server.bearer_token({"authorization": message.authorization or ""}),
                )
                self.authorized = True
            if message.close_socket:
                await self.close_socket()
                return
            context = self.active.get(context_id)
            if context is not None:
                context.last_input = time.monotonic()
            if context is None:
                if message.close_context or (self.multi and not message.text and not message.flush):
                    return  # closing, or keeping alive, a context that has ended: nothing to do
                if not self.multi and self.opened:
                    raise ApiError(409, "This stream has ended; open a new connection.", code="stream_ended")
                context = await self.open(message)
            elif message.close_context or (not self.multi and message.text == ""):
                await context.end()  # its text is complete: the rest is spoken, then isFinal
            else:
                await self.add(context, message)
        except ApiError as exc:
            await self.send_error(exc, context_id)
            if exc.code == "invalid_api_key":
                await self.hang_up(1008, exc.message)

    async def open(self, message: ElevenLabsMessage) -> Utterance:
        context = await self.open_utterance(
            message.context_id,
            lambda: self.realtime_job(
                elevenlabs_fields(
                    self.websocket.path_params["voice_id"],
                    self.output_format,
                    message.voice_settings,
                    self.language,
                    normalization=self.normalization,
                ),
                "mp3",
            ),
            lambda context: self.add(context, message),
            at_once=self.multi,
        )
        self.opened = True
        return context

    async def add(self, context: Utterance, message: ElevenLabsMessage) -> None:
        if message.text:
            await context.add_text(message.text)
        if message.flush or (self.auto_mode and message.text and message.text.strip()):
            await context.flush()

    async def close_socket(self) -> None:
        for context in list(self.active.values()):
            await context.end()
        self.closing_socket = True
        if not self.active:
            await self.hang_up()

    async def send_audio(
        self, context: Utterance, data: bytes, original: list[CharTime], normalized: list[CharTime], start: float
    ) -> None:
        message: dict[str, Any] = {"audio": b64(data), "isFinal": False}
        if original or normalized:
            message |= {
                "alignment": elevenlabs_alignment(original, start),
                "normalizedAlignment": elevenlabs_alignment(normalized, start),
            }
        await self.send_json(self.tagged(message, context.id))

    def tagged(self, message: dict[str, Any], context_id: str | None) -> dict[str, Any]:
        return message | {"contextId": context_id} if self.multi and context_id is not None else message

    async def finished(self, utterance: Utterance, error: Exception | None) -> None:
        if error is not None:
            await self.send_error(server.client_error(error), utterance.id)
        await self.send_json(self.tagged({"isFinal": True}, utterance.id))
        if not self.multi or (self.closing_socket and not self.active):
            await self.hang_up()

    async def send_error(self, exc: ApiError, context_id: str | None) -> None:
        await self.send_json(
            self.tagged(
                {
                    "message": exc.message,
                    "error": exc.code or "invalid_request",
                    "code": 1008 if exc.status == 401 else exc.status,
                },
                context_id,
            )
        )


class ElevenLabsMultiSession(ElevenLabsSession):
    """multi-stream-input: independent contexts side by side, named by `context_id`."""

    multi = True


# --- Cartesia ----------------------------------------------------------------------------------

CARTESIA_ENCODINGS = {"pcm_s16le": "pcm", "pcm_f32le": "pcm", "pcm_mulaw": "ulaw", "pcm_alaw": "alaw"}


# Cartesia's speed words (top-level `speed`; Sonic-2's `voice.__experimental_controls.speed`, whose numbers
# run from -1, slowest, to 1, fastest) as steps from -1 to 1; a step x speaks at 1 + x/2 times the pace.
CARTESIA_SPEED_STEPS = {"slowest": -1.0, "slow": -0.5, "normal": 0.0, "fast": 0.5, "fastest": 1.0}


def speed_step(value: Any, words: tuple[str, ...]) -> Any:
    """A speed word as its step; anything else as it is (the field checks it)."""
    if isinstance(value, str):
        if value not in words:
            raise ValueError(f"must be one of {', '.join(map(repr, words))} or a number")
        return CARTESIA_SPEED_STEPS[value]
    return value


class CartesiaObject(NullIsDefault):
    """A nested object of a Cartesia request: anything else is refused in words, not by our class's name."""

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, data: Any) -> Any:
        if not isinstance(data, dict | cls):
            raise ValueError("must be a JSON object")
        return data


class CartesiaControls(CartesiaObject):
    speed: float | None = Field(None, ge=-1.0, le=1.0)  # emotion is accepted and ignored

    @field_validator("speed", mode="before")
    @classmethod
    def _speed_word(cls, value: Any) -> Any:
        return speed_step(value, tuple(CARTESIA_SPEED_STEPS))


class CartesiaVoice(CartesiaObject):
    mode: str = "id"
    id: str = Field(min_length=1)
    controls: CartesiaControls | None = Field(None, alias="__experimental_controls")

    @field_validator("mode")
    @classmethod
    def _by_id(cls, value: str) -> str:
        if value != "id":  # "embedding" voices are Cartesia's own vectors: no counterpart here
            raise ValueError(f"only voices by id are served here (mode 'id'), not {value[:40]!r}")
        return value


class CartesiaOutput(CartesiaObject):
    container: Literal["raw", "wav", "mp3"] = "raw"
    encoding: Literal["pcm_s16le", "pcm_f32le", "pcm_mulaw", "pcm_alaw"] | None = None
    sample_rate: int
    bit_rate: int | None = Field(None, ge=8000, le=320000)


class CartesiaGeneration(CartesiaObject):
    speed: float | None = Field(None, ge=0.25, le=4.0)  # volume and emotion are accepted and ignored


class CartesiaRequest(NullIsDefault):
    model_id: str = ""  # any model: the one loaded speaks
    transcript: str = ""
    voice: CartesiaVoice | None = None  # a voice id, or {"mode": "id", "id": ...}
    language: str | None = None
    context_id: str | None = Field(None, min_length=1, max_length=128)
    output_format: CartesiaOutput | None = None
    more: bool = Field(False, alias="continue")
    add_timestamps: bool = False
    max_buffer_delay_ms: int = Field(3000, ge=0, le=5000)
    flush: bool = False
    cancel: bool = False
    generation_config: CartesiaGeneration | None = None
    speed: float | None = Field(None, ge=0.25, le=4.0)  # a multiplier, or "slow", "normal", "fast"

    @field_validator("voice", mode="before")
    @classmethod
    def _voice_id(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"mode": "id", "id": value}
        if not isinstance(value, dict):
            raise ValueError('must be a voice id or {"mode": "id", "id": ...}')
        return value

    @field_validator("speed", mode="before")
    @classmethod
    def _speed_word(cls, value: Any) -> Any:
        step = speed_step(value, ("slow", "normal", "fast"))
        return 1.0 + step / 2 if isinstance(value, str) else step


def cartesia_speed(request: CartesiaRequest) -> float | None:
    """The first speed the request gives, of generation_config.speed, the top-level speed and
    voice.__experimental_controls.speed, as a multiplier."""
    if request.generation_config is not None and request.generation_config.speed is not None:
        return request.generation_config.speed
    if request.speed is not None:
        return request.speed
    controls = request.voice.controls if request.voice is not None else None
    if controls is not None and controls.speed is not None:
        return 1.0 + controls.speed / 2
    return None


def cartesia_voice_id(request: CartesiaRequest) -> str:
    voice = request.voice
    if voice is None:
        raise ApiError(400, "'voice' is required.", param="voice", code="missing_field")
    return voice.id


@dataclass
class CartesiaContext(Utterance):
    """A Cartesia context: its word timestamps, flushes and output (a vendor context's, and Cartesia's own)."""

    words: Words = field(default_factory=Words)
    sent_at: float = field(default_factory=time.monotonic)
    flushes: list[int] = field(default_factory=list)  # chunks queued at each pending flush
    flushed: int = 0
    float32: bool = False  # pcm_f32le: the s16 PCM is sent as float32
    timer: asyncio.TimerHandle | None = None  # max_buffer_delay_ms


def cartesia_fields(request: CartesiaRequest, websocket: bool) -> SynthesisFields:
    """Our synthesis fields for a request."""
    voice = cartesia_voice_id(request)
    if request.output_format is None:
        raise ApiError(400, "'output_format' is required.", param="output_format", code="missing_field")
    out = request.output_format
    if websocket and out.container != "raw":
        raise ApiError(
            400,
            "The WebSocket sends raw audio: use container 'raw'.",
            param="output_format.container",
            code="unsupported_format",
        )
    if out.container == "mp3":
        name = "mp3"
    elif out.encoding is None:
        raise ApiError(
            400, "'output_format.encoding' is required.", param="output_format.encoding", code="missing_field"
        )
    elif out.container == "wav":
        if out.encoding != "pcm_s16le":
            raise ApiError(400, "WAV is sent as pcm_s16le.", param="output_format.encoding", code="unsupported_format")
        name = "wav"
    else:
        name = CARTESIA_ENCODINGS[out.encoding]
    fields = server.parse_model(
        SynthesisFields,
        {
            "voice": voice,
            "response_format": name,
            "sample_rate": out.sample_rate,
            "speed": cartesia_speed(request),
            "language": request.language,
        },
    )
    bitrate = f"_{out.bit_rate // 1000}" if name == "mp3" and out.bit_rate else ""
    if bitrate:
        fields = fields.model_copy(update={"output_format": f"mp3_{out.sample_rate}{bitrate}"})
    return fields


def sends_float32(request: CartesiaRequest) -> bool:
    """pcm_f32le: the s16 PCM is sent as float32."""
    out = request.output_format
    return out is not None and out.container == "raw" and out.encoding == "pcm_f32le"


def cartesia_error_body(exc: ApiError) -> dict[str, Any]:
    return {
        "title": "Invalid request" if exc.status < 500 else "Server error",
        "message": exc.message,
        "error_code": exc.code or "invalid_request",
        "status_code": exc.status,
    }


def cartesia_error(exc: ApiError) -> JSONResponse:
    return JSONResponse(cartesia_error_body(exc), status_code=exc.status)


async def cartesia_bytes(request: Request) -> Response:
    """POST /tts/bytes: the whole transcript, streamed as it is made (whole-chunk decoding)."""
    check_key(server.state(request), request.headers.get("x-api-key"), server.bearer_token(request.headers))
    body: CartesiaRequest = server.parse_model(CartesiaRequest, await server.read_json(request, server.MAX_JSON_BYTES))
    fields = cartesia_fields(body, websocket=False)
    float32 = sends_float32(body)
    response = await speak_http(
        request, fields, body.transcript, streaming=False, param="transcript", convert=s16_to_f32 if float32 else None
    )
    if float32:
        response.headers["X-Encoding"] = "f32le"
        response.headers["X-Bit-Depth"] = "32"
    return response


def ends_sentence(buffer: str) -> bool:
    """Text still arriving whose last sentence is complete: it ends with a sentence end and then a space
    ("Hello there. "), which split_complete waits on for what follows (it could be "Mr. " or "3. ")."""
    if not buffer or not buffer[-1].isspace() or not buffer.strip():
        return False
    tail = buffer[-400:]
    _, rest = server.split_complete(tail + "1")  # a probe that neither starts nor continues a sentence
    return rest.strip() == "1"


async def cartesia_sse(request: Request) -> Response:
    """POST /tts/sse: the transcript's raw audio as Cartesia's events (chunk, timestamps with
    add_timestamps, done; an error event, done, if it fails on the way), streamed as it is made."""
    check_key(server.state(request), request.headers.get("x-api-key"), server.bearer_token(request.headers))
    body: CartesiaRequest = server.parse_model(CartesiaRequest, await server.read_json(request, server.MAX_JSON_BYTES))
    fields = cartesia_fields(body, websocket=True)
    job, chunks = await server.request_job(request, fields, body.transcript, "pcm", True, param="transcript")
    audio = await server.speech_stream(request, job, chunks, True)
    float32 = sends_float32(body)
    tagged = {"context_id": body.context_id} if body.context_id else {}

    async def events() -> AsyncIterator[bytes]:
        words, sent_at = Words(), time.monotonic()
        try:
            async for data, original, _, _ in with_timings(audio, job):
                if data:
                    now = time.monotonic()
                    step, sent_at = now - sent_at, now
                    yield cartesia_event(
                        "chunk",
                        data=b64(s16_to_f32(data) if float32 else data),
                        done=False,
                        status_code=206,
                        step_time=round(1000 * step, 1),
                        **tagged,
                    )
                if body.add_timestamps and (done := words.add(original, final=not data)):
                    yield cartesia_event(
                        "timestamps", done=False, status_code=206, word_timestamps=word_timestamps(done), **tagged
                    )
            yield cartesia_event("done", done=True, status_code=200, **tagged)
        except Exception as exc:
            server.log_failure(exc)
            error = cartesia_error_body(server.client_error(exc))
            yield cartesia_event("error", done=True, request_id=job.id, **error, **tagged)

    return StreamingResponse(
        server.ended_cleanly(events()), media_type="text/event-stream", headers={"X-Request-Id": job.id}
    )


def cartesia_event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, separators=(',', ':'))}\n\n".encode()


def word_timestamps(words: list[tuple[str, float, float]]) -> dict[str, list[Any]]:
    return {
        "words": [w for w, _, _ in words],
        "start": [round(s, 3) for _, s, _ in words],
        "end": [round(e, 3) for _, _, e in words],
    }


CARTESIA_EPOCH = "2025-01-01T00:00:00Z"  # created_at: the server's voices have no creation time of their own


def cartesia_voice(voice: VoiceInfo) -> dict[str, Any]:
    """A voice in Cartesia's shape (its `Voice`)."""
    language = voice.language
    return {
        "id": voice.id,
        "name": voice.name,
        "description": voice.description,
        "tagline": voice.what,
        "language": language,
        "locales": [{"locale": code, "is_native": i == 0} for i, code in enumerate(voice.languages)],
        "is_owner": voice.kind == "uploaded",
        "is_public": voice.kind != "uploaded",
        "access": "private" if voice.kind == "uploaded" else "public",
        "visibility": "owner" if voice.kind == "uploaded" else "all",
        "created_at": CARTESIA_EPOCH,
        "gender": None,
        "preview_file_url": None,
    }


async def cartesia_voices(request: Request) -> Response:
    """GET /voices: Cartesia's page of voices ({"data", "has_more", "next_page"}), limit (1-100, default
    10), starting_after / ending_before (a voice id), q (name, description or id), is_owner."""
    check_key(server.state(request), request.headers.get("x-api-key"), server.bearer_token(request.headers))
    params = request.query_params
    limit = query_int(params, "limit", 10, 1, 100)
    voices = [cartesia_voice(v) for v in await asyncio.to_thread(voice_catalog, server.state(request))]
    if q := (params.get("q") or "").strip().lower():
        voices = [v for v in voices if q in f"{v['id']} {v['name']} {v['description']}".lower()]
    if params.get("is_owner") not in (None, ""):
        voices = [v for v in voices if v["is_owner"] == query_bool(params, "is_owner")]
    ids = [v["id"] for v in voices]
    for name in ("starting_after", "ending_before"):
        if (cursor := params.get(name)) and cursor not in ids:
            raise ApiError(400, f"'{name}' is not a voice id of this list.", param=name, code="invalid_value")
    if after := params.get("starting_after"):
        page = voices[ids.index(after) + 1 :][:limit]
        more = ids.index(after) + 1 + limit < len(voices)
    elif before := params.get("ending_before"):
        page = voices[: ids.index(before)][-limit:]
        more = ids.index(before) > limit
    else:
        page, more = voices[:limit], limit < len(voices)
    return JSONResponse({"data": page, "has_more": more, "next_page": page[-1]["id"] if more and page else None})


async def cartesia_voice_by_id(request: Request) -> Response:
    """GET /voices/{id}: one voice, or 404."""
    check_key(server.state(request), request.headers.get("x-api-key"), server.bearer_token(request.headers))
    voice = await asyncio.to_thread(voice_info, server.state(request), request.path_params["voice_id"])
    if voice is None:
        raise ApiError(404, "Voice not found.", param="id", code="not_found")
    return JSONResponse(cartesia_voice(voice))


class CartesiaSession(VendorSession):
    """/tts/websocket: contexts side by side, each fed with `continue` until `continue: false`."""

    utterance_type = CartesiaContext

    async def read_messages(self) -> None:
        headers, query = self.websocket.headers, self.websocket.query_params
        try:
            check_key(self.app_state, headers.get("x-api-key"), query.get("api_key"), server.bearer_token(headers))
        except ApiError as exc:
            await self.send_json(self.error_message(exc, None))
            await self.hang_up(1008, exc.message)
            return
        await super().read_messages()

    async def receive(self, text: str | None, data: bytes | None) -> None:
        context_id = None
        try:
            message = server.ws_message(text)
            named = message.get("context_id") if isinstance(message, dict) else None
            context_id = named if isinstance(named, str) and named else None  # errors name it, even a bad message's
            request: CartesiaRequest = server.parse_model(CartesiaRequest, message)
            context_id = request.context_id or uuid.uuid4().hex
            context = self.active.get(context_id)
            if request.cancel:
                if context is not None:
                    await self.cancel(context)
                return
            if context is None:
                await self.open_utterance(
                    context_id,
                    lambda: self.realtime_job(cartesia_fields(request, True), "pcm"),
                    lambda context: self.start(context, request),
                    at_once=True,
                )
            else:
                await self.feed(context, request)
        except ApiError as exc:
            await self.send_json(self.error_message(exc, context_id))
            # The error is an open context's last message (done: true): it is cancelled, so that nothing
            # follows. A context already ended (text sent after `continue: false`) is spoken to its end.
            if context_id is not None and (context := self.active.get(context_id)) is not None and not context.ended:
                await self.cancel(context)

    async def start(self, context: Utterance, request: CartesiaRequest) -> None:
        """A new context's output and first text (the whole transcript at once is chunked as HTTP's)."""
        assert isinstance(context, CartesiaContext)
        context.float32, context.timestamps = sends_float32(request), request.add_timestamps
        if not request.more and not request.flush:
            await context.say_all(request.transcript, param="transcript")
        else:
            await self.feed(context, request)

    async def feed(self, context: Utterance, request: CartesiaRequest) -> None:
        assert isinstance(context, CartesiaContext)
        if request.transcript:
            await context.add_text(request.transcript)
        if context.timer is not None:
            context.timer.cancel()
            context.timer = None
        if not request.more:
            await context.end()
        elif request.flush or request.max_buffer_delay_ms == 0 or ends_sentence(context.buffer):
            await context.flush()
            if request.flush:
                context.flushes.append(context.queued)
        elif context.buffer.strip():
            context.timer = asyncio.get_running_loop().call_later(
                request.max_buffer_delay_ms / 1000, lambda: asyncio.ensure_future(context.flush())
            )

    async def send_audio(
        self, context: Utterance, data: bytes, original: list[CharTime], normalized: list[CharTime], start: float
    ) -> None:
        assert isinstance(context, CartesiaContext)
        if data:
            now = time.monotonic()
            step, context.sent_at = now - context.sent_at, now
            await self.send_json(
                {
                    "type": "chunk",
                    "data": b64(s16_to_f32(data) if context.float32 else data),
                    "done": False,
                    "status_code": 206,
                    "step_time": round(1000 * step, 1),
                    "context_id": context.id,
                }
            )
        words = context.words.add(original, final=not data)
        if words and context.timestamps:
            await self.send_json(
                {
                    "type": "timestamps",
                    "done": False,
                    "status_code": 206,
                    "context_id": context.id,
                    "word_timestamps": word_timestamps(words),
                }
            )
        await self.send_flushes(context, len(context.job.timeline.chunks_generated))

    async def send_flushes(self, context: CartesiaContext, chunks_done: int) -> None:
        """flush_done for each flush whose text has been generated (its last chunk's generation ended)."""
        while context.flushes and chunks_done >= context.flushes[0]:
            context.flushes.pop(0)
            context.flushed += 1
            await self.send_json(
                {
                    "type": "flush_done",
                    "done": False,
                    "flush_done": True,
                    "flush_id": context.flushed,
                    "status_code": 206,
                    "context_id": context.id,
                }
            )

    async def finished(self, utterance: Utterance, error: Exception | None) -> None:
        assert isinstance(utterance, CartesiaContext)
        if utterance.timer is not None:
            utterance.timer.cancel()
        if error is not None:
            await self.send_json(self.error_message(server.client_error(error), utterance.id))
        elif not utterance.cancelled:
            await self.send_flushes(utterance, utterance.queued)
            await self.send_json({"type": "done", "done": True, "status_code": 200, "context_id": utterance.id})

    @staticmethod
    def error_message(exc: ApiError, context_id: str | None) -> dict[str, Any]:
        return {"type": "error", "done": True, "context_id": context_id, **cartesia_error_body(exc)}


# --- Wyoming (Home Assistant) ------------------------------------------------------------------


WYOMING_MAX_HEADER_BYTES = 64 * 1024  # an event's JSON line (asyncio's stream limit too)
WYOMING_MAX_DATA_BYTES = 1024 * 1024  # an event's data or payload: a synthesize text is a few KB
WYOMING_LINGER_SECONDS = 2.0  # after a refused event, for the client to read the error before the close


class WyomingRefused(Exception):
    """An event the server will not read: it gets an `error` event, then the connection closes."""

    def __init__(self, text: str, code: str = "invalid_event"):
        super().__init__(text)
        self.text, self.code = text, code


def wyoming_length(header: dict[str, Any], name: str) -> int:
    """The header's data_length or payload_length, checked before anything of it is read."""
    value = header.get(name)
    if value is None:
        return 0
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and value > WYOMING_MAX_DATA_BYTES:
        raise WyomingRefused(f"'{name}' is limited to {WYOMING_MAX_DATA_BYTES} bytes.", "event_too_large")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WyomingRefused(f"'{name}' must be a whole number of bytes.")
    return value


def wyoming_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:  # not JSON, or not UTF-8
        raise WyomingRefused(f"Not a Wyoming event: its {what} is not JSON.") from None
    if not isinstance(value, dict):
        raise WyomingRefused(f"Not a Wyoming event: its {what} is not a JSON object.")
    return value


async def read_wyoming_event(reader: asyncio.StreamReader, timeout: float) -> Event | None:
    """The next event, read as the wyoming package's async_read_event reads it, but within limits and
    checked: None when the stream ends; TimeoutError when no event starts within `timeout` seconds
    (nothing of it read); WyomingRefused for an event too large (its data never read) or malformed."""
    try:
        line = await server.within(timeout, reader.readuntil(b"\n"))
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise WyomingRefused("The connection ended inside an event's header.") from None
        return None
    except asyncio.LimitOverrunError:  # over the reader's limit (asyncio's default, the same 64 KiB)
        line = None
    if line is None or len(line) > WYOMING_MAX_HEADER_BYTES:
        raise WyomingRefused(
            f"An event's header line is limited to {WYOMING_MAX_HEADER_BYTES} bytes.", "event_too_large"
        )
    header = wyoming_object(line, "header line")
    kind, data = header.get("type"), header.get("data")
    data = {} if data is None else data
    if not isinstance(kind, str) or not isinstance(data, dict):
        raise WyomingRefused("Not a Wyoming event: 'type' must be a string and 'data' an object.")
    data_length, payload_length = wyoming_length(header, "data_length"), wyoming_length(header, "payload_length")
    try:  # the rest of an event that has begun comes at once; a client that stalls in it is given up
        if data_length:
            data = {**data, **wyoming_object(await server.within(timeout, reader.readexactly(data_length)), "data")}
        payload = await server.within(timeout, reader.readexactly(payload_length)) if payload_length else None
    except TimeoutError:
        raise WyomingRefused(
            f"An event's data did not come within {timeout:g} s (INPUT_TIMEOUT).", "input_timeout"
        ) from None
    except asyncio.IncompleteReadError:
        return None
    return Event(type=kind, data=data, payload=payload)


class WyomingSession(IdleAwareSession):
    """One Wyoming TCP connection: `synthesize` is one utterance; `synthesize-start`, chunks and
    `synthesize-stop` one utterance fed sentence by sentence, ended by `synthesize-stopped`. A connection
    that sends no event for INPUT_TIMEOUT while nothing is being spoken is closed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, app_state: AppState):
        super().__init__(None, app_state, route="wyoming")
        self.reader, self.writer = reader, writer
        self.streaming: Utterance | None = None  # the utterance of a synthesize-start ... stop stream
        self.numbers = iter(range(1, 1 << 62))
        self.rate = app_state.engine.sample_rate if app_state.engine.sample_rate in server.SAMPLE_RATES else 24000

    async def read_messages(self) -> None:
        try:
            while not self.closing and (event := await self.next_event()) is not None:
                await self.handle(event)
        except WyomingRefused as refused:
            await self.write(WyomingError(text=refused.text, code=refused.code).event())
            await self.linger()
        except ConnectionError:
            return

    async def linger(self) -> None:
        """Close after a refusal without resetting the connection: a socket closed with bytes unread sends a
        reset, which can destroy the error event on its way. Stop writing, then let what the client still
        sends drain away (never kept) for WYOMING_LINGER_SECONDS at most."""
        if not self.writer.can_write_eof():
            return
        self.writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(WYOMING_LINGER_SECONDS):
                while await self.reader.read(64 * 1024):
                    pass

    async def next_event(self) -> Event | None:
        timeout = self.app_state.settings.input_timeout
        while True:
            try:
                return await read_wyoming_event(self.reader, timeout)
            except TimeoutError:
                if not self.sounding(timeout):
                    raise WyomingRefused(f"No event for {timeout:g} s (INPUT_TIMEOUT).", "input_timeout") from None

    async def handle(self, event: Event) -> None:
        try:
            if Describe.is_type(event.type):
                await self.write((await asyncio.to_thread(self.info)).event())
            elif Ping.is_type(event.type):
                await self.write(Pong(text=Ping.from_event(event).text).event())
            elif SynthesizeStart.is_type(event.type):
                if self.streaming is not None:
                    raise ApiError(409, "A synthesize stream is open already: stop it first.", code="already_started")
                self.streaming = await self.open_utterance(
                    str(next(self.numbers)), lambda: self.job(SynthesizeStart.from_event(event).voice)
                )
            elif SynthesizeChunk.is_type(event.type):
                await self.stream_in_progress().add_text(SynthesizeChunk.from_event(event).text)
            elif SynthesizeStop.is_type(event.type):
                await self.stream_in_progress().end()
                self.streaming = None
            elif Synthesize.is_type(event.type) and self.streaming is None:  # inside a stream: a copy, ignored
                await self.open_utterance(
                    str(next(self.numbers)),
                    lambda: self.job(Synthesize.from_event(event).voice),
                    lambda utterance: utterance.say_all(Synthesize.from_event(event).text),
                )
        except (ApiError, KeyError, TypeError, AttributeError, ValueError) as exc:  # ValueError: text not UTF-8
            message = exc.message if isinstance(exc, ApiError) else f"Malformed {event.type} event."
            code = exc.code if isinstance(exc, ApiError) else "invalid_event"
            await self.write(WyomingError(text=message, code=code).event())

    def stream_in_progress(self) -> Utterance:
        if self.streaming is None:
            raise ApiError(400, "No synthesize-start before this event.", code="not_started")
        return self.streaming

    async def job(self, voice: Any) -> SpeechJob:
        fields = server.parse_model(
            SynthesisFields,
            {
                "voice": getattr(voice, "name", None),
                "language": getattr(voice, "language", None),
                "response_format": "pcm",
                "sample_rate": self.rate,
            },
        )
        return await self.realtime_job(fields, "pcm")

    def info(self) -> Info:
        engine = self.app_state.engine
        attribution = (
            Attribution(name="Rhasspy", url="https://github.com/rhasspy/piper")
            if engine.name == "piper"
            else Attribution(name="Resemble AI", url="https://github.com/resemble-ai/chatterbox")
        )
        # Home Assistant's dropdown shows each voice's description: its name, what it is and its languages.
        voices = [
            TtsVoice(
                name=v.id,
                attribution=attribution,
                installed=True,
                description=v.description,
                version=None,
                languages=v.languages,
            )
            for v in voice_catalog(self.app_state)
        ]
        return Info(
            tts=[
                TtsProgram(
                    name="chatterbox-tts-server",
                    attribution=attribution,
                    installed=True,
                    description=f"{engine.name} via chatterbox-tts-server",
                    version=server.__version__,
                    voices=voices,
                    supports_synthesize_streaming=True,
                )
            ]
        )

    async def stream(self, utterance: Utterance) -> None:
        await self.write(AudioStart(rate=self.rate, width=2, channels=1).event())
        async for data in utterance.audio():
            self.sounded()
            await self.write(AudioChunk(rate=self.rate, width=2, channels=1, audio=data).event())

    async def finished(self, utterance: Utterance, error: Exception | None) -> None:
        if error is not None:
            body = server.error_body(error)
            await self.write(WyomingError(text=body["message"], code=body["code"]).event())
        await self.write(AudioStop().event())
        if utterance.chunks is None:  # it came as a stream
            await self.write(SynthesizeStopped().event())

    async def write(self, event: Event) -> None:
        await self.send(async_write_event(event, self.writer))  # bounded, as every send to a client


class WyomingHandler(AsyncEventHandler):
    """The wyoming package's server hands each connection to one of these; its session reads the events
    (read_wyoming_event, not the package's reader: that one has no limits)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, app_state: AppState):
        super().__init__(reader, writer)
        self.session = WyomingSession(reader, writer, app_state)

    async def handle_event(self, event: Event) -> bool:
        await self.session.handle(event)
        return True

    async def run(self) -> None:
        await serve_tcp(self.session, self.writer)


# --- Telephony: what a call says ---------------------------------------------------------------


async def fixed_frames(audio: AsyncIterator[bytes], size: int, silence: bytes) -> AsyncIterator[bytes]:
    """A stream cut into frames of `size` bytes, the last one padded with `silence`."""
    pending = b""
    async for data in audio:
        pending += data
        whole = len(pending) - len(pending) % size
        for i in range(0, whole, size):
            yield pending[i : i + size]
        pending = pending[whole:]
    if pending:
        yield pending.ljust(size, silence)


class CallSpeech(SynthesisFields):
    """POST /v1/telephony/audiosocket/{uuid}: something for the call to say. The call's codec sets
    the audio format; `hangup` ends the call once this (and anything queued after it) is spoken."""

    text: str
    hangup: bool = True


MAX_SPEECHES_PER_CALL = 16  # speeches waiting to be said on one call: a call's prompts, well within it


@dataclass
class CallScript:
    queue: asyncio.Queue[CallSpeech] = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.monotonic)
    connected: bool = False


class CallScripts:
    """What each call is to say, registered by call id before or while the call is connected: at most
    MAX_CALLS calls, MAX_SPEECHES_PER_CALL speeches waiting on each; a call never connected is forgotten
    after UNCONNECTED_TTL."""

    MAX_CALLS = 1000
    UNCONNECTED_TTL = 600.0  # seconds a registration waits for its call

    def __init__(self) -> None:
        self.calls: dict[str, CallScript] = {}

    def forget_stale(self) -> None:
        """Registrations whose call never connected within UNCONNECTED_TTL (swept at each add and take)."""
        now = time.monotonic()
        for stale in [c for c, s in self.calls.items() if not s.connected and now - s.created > self.UNCONNECTED_TTL]:
            del self.calls[stale]

    def add(self, call_id: str, speech: CallSpeech) -> int:
        self.forget_stale()
        if call_id not in self.calls and len(self.calls) >= self.MAX_CALLS:
            raise ApiError(
                429,
                f"{self.MAX_CALLS} calls are registered already; retry shortly.",
                code="too_many_calls",
                headers={"Retry-After": "1"},
            )
        script = self.calls.setdefault(call_id, CallScript())
        if script.queue.qsize() >= MAX_SPEECHES_PER_CALL:
            raise ApiError(
                429,
                f"Call {call_id} has {MAX_SPEECHES_PER_CALL} speeches waiting already; retry once some are said.",
                code="too_many_speeches",
                headers={"Retry-After": "1"},
            )
        script.queue.put_nowait(speech)
        return script.queue.qsize()

    def take(self, call_id: str) -> CallScript | None:
        self.forget_stale()
        script = self.calls.get(call_id)
        if script is not None:
            script.connected = True
        return script

    def end(self, call_id: str) -> None:
        self.calls.pop(call_id, None)


def call_scripts(app_state: AppState) -> CallScripts:
    return app_state.protocol_state[__name__]  # this add-on's state (protocol())


def call_id(raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise ApiError(400, f"{raw!r} is not a UUID.", param="uuid", code="invalid_value") from None


async def register_call_speech(request: Request) -> Response:
    app_state = server.state(request)
    call = call_id(request.path_params["uuid"])
    speech: CallSpeech = server.parse_model(CallSpeech, await server.read_json(request, server.MAX_JSON_BYTES))
    reading = server.text_reading(speech, app_state)
    await asyncio.to_thread(
        functools.partial(
            server.speech_script, speech.text, app_state.settings, reading, server.ssml_of(speech), param="text"
        )
    )
    await server.speech_job(speech, app_state, Priority.REALTIME, "pcm", reading)  # refuse what cannot be said, now
    queued = call_scripts(app_state).add(call, speech)
    return JSONResponse({"uuid": call, "queued": queued}, status_code=202)


@dataclass
class CallUtterance(Utterance):
    hangup: bool = False  # hang up once this has been spoken


class CallSession(IdleAwareSession):
    """A phone call that says its script: each registered speech is one utterance, spoken in order;
    after one that says `hangup`, with nothing more queued, the call is hung up."""

    utterance_type = CallUtterance
    fmt, rate = "pcm", 8000
    call: str | None = None  # the call id whose registered speech it says
    script: CallScript | None = None
    pump: asyncio.Future[None] | None = None

    async def start_script(self, script: CallScript | None, first: CallSpeech | None = None) -> None:
        self.script = script
        if first is not None:
            await self.say(first)
        if script is not None:
            self.pump = asyncio.ensure_future(self.follow(script))

    async def follow(self, script: CallScript) -> None:
        while True:
            speech = await script.queue.get()
            try:
                await self.say(speech)
            except ApiError as exc:  # checked when it was registered; the engine may still refuse it
                logger.warning("{} call: {}", self.route, exc.message)

    async def say(self, speech: CallSpeech) -> None:
        fields = speech.model_copy(
            update={"response_format": self.fmt, "sample_rate": self.rate, "output_format": None}
        )
        await self.open_utterance(
            uuid.uuid4().hex[:12],
            lambda: self.realtime_job(fields, self.fmt),
            lambda utterance: utterance.say_all(speech.text),
            hangup=speech.hangup,
        )

    def sounding(self, window: float) -> bool:
        return super().sounding(window) or (self.script is not None and not self.script.queue.empty())

    def hangs_up_after(self, utterance: Utterance) -> bool:
        """The utterance asks to hang up, and nothing else is left to say."""
        queued = self.script is not None and not self.script.queue.empty()
        others = any(u is not utterance for u in self.active.values())
        return isinstance(utterance, CallUtterance) and utterance.hangup and not queued and not others

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            if self.pump is not None:
                self.pump.cancel()
            if self.call is not None:
                call_scripts(self.app_state).end(self.call)


# --- Asterisk AudioSocket ----------------------------------------------------------------------

# AudioSocket frame types (DTMF, 0x03, is read and ignored)
AUDIOSOCKET_HANGUP, AUDIOSOCKET_UUID, AUDIOSOCKET_AUDIO, AUDIOSOCKET_ERROR = 0x00, 0x01, 0x10, 0xFF
AUDIOSOCKET_FRAME = 320  # 20 ms of 8 kHz signed 16-bit linear
FRAME_SECONDS = 0.02


def audiosocket_frame(kind: int, payload: bytes = b"") -> bytes:
    return bytes([kind]) + len(payload).to_bytes(2, "big") + payload


class Pacer:
    """Real-time pacing: one frame per FRAME_SECONDS; after a stall (the model fell behind) the
    clock restarts instead of bursting to catch up."""

    def __init__(self) -> None:
        self.due = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        if now > self.due + FRAME_SECONDS:
            self.due = now
        if self.due > now:
            await asyncio.sleep(self.due - now)
        self.due += FRAME_SECONDS


class AudioSocketSession(CallSession):
    """An Asterisk AudioSocket connection: the UUID frame names the call's script; speech leaves as
    320-byte slin frames paced in real time; a hangup frame ends the call. Asterisk sends the caller's
    audio all along: no frame for INPUT_TIMEOUT while nothing is being said is a call gone, hung up."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, app_state: AppState):
        super().__init__(None, app_state, route="audiosocket")
        self.reader, self.writer = reader, writer
        self.pacer = Pacer()

    async def read_frame(self) -> tuple[int, bytes] | None:
        """The next frame; None when the connection ends (or stalls inside a frame); TimeoutError when no
        frame starts within INPUT_TIMEOUT (nothing of it read)."""
        timeout = self.app_state.settings.input_timeout
        try:
            header = await server.within(timeout, self.reader.readexactly(3))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        try:
            return header[0], await server.within(timeout, self.reader.readexactly(int.from_bytes(header[1:], "big")))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return None

    async def refuse(self, reason: str) -> None:
        logger.warning("audiosocket call {}: {}", self.call, reason)
        await self.send_frame(audiosocket_frame(AUDIOSOCKET_ERROR, b"\x00"))  # a frame of its own: an error
        await self.send_frame(audiosocket_frame(AUDIOSOCKET_HANGUP))

    async def read_messages(self) -> None:
        try:
            first = await self.read_frame()
        except TimeoutError:
            first = None
        try:
            if first is None or first[0] != AUDIOSOCKET_UUID or len(first[1]) != 16:
                raise ApiError(400, "An AudioSocket stream starts with its 16-byte UUID frame.", code="invalid_frame")
            self.call = str(uuid.UUID(bytes=first[1]))
            script = call_scripts(self.app_state).take(self.call)
            if script is None:
                raise ApiError(
                    404,
                    f"No speech registered for call {self.call}: POST /v1/telephony/audiosocket/{self.call} first.",
                    code="unknown_call",
                )
            await self.start_script(script)
        except ApiError as exc:
            await self.refuse(exc.message)
            return
        timeout = self.app_state.settings.input_timeout
        while not self.closing:
            try:
                frame = await self.read_frame()
            except TimeoutError:
                if self.sounding(timeout):
                    continue
                await self.refuse(f"no frame for {timeout:g} s (INPUT_TIMEOUT): hung up")
                return
            if frame is None or frame[0] in (AUDIOSOCKET_HANGUP, AUDIOSOCKET_ERROR):
                return  # the caller hung up (or Asterisk failed): the call is over
            # audio (the caller's voice) and DTMF: nothing to do

    async def stream(self, utterance: Utterance) -> None:
        async for frame in fixed_frames(utterance.audio(), AUDIOSOCKET_FRAME, b"\x00"):
            self.sounded()
            await self.pacer.wait()
            await self.send_frame(audiosocket_frame(AUDIOSOCKET_AUDIO, frame))

    async def finished(self, utterance: Utterance, error: Exception | None) -> None:
        if isinstance(error, ApiError):  # any other failure was logged, with its traceback, as it happened
            logger.warning("audiosocket call {}: {}", self.call, error.message)
        if self.hangs_up_after(utterance):
            await self.send_frame(audiosocket_frame(AUDIOSOCKET_HANGUP))
            self.closing = True
            self.writer.close()  # ends the read loop too

    async def send_frame(self, data: bytes) -> None:
        self.writer.write(data)
        await self.send(self.writer.drain())  # bounded, as every send to a client

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            self.writer.close()


# --- Asterisk chan_websocket -------------------------------------------------------------------

ASTERISK_CODECS = {
    "ulaw": ("ulaw", 8000),
    "alaw": ("alaw", 8000),
    "slin": ("pcm", 8000),
    "slin16": ("pcm", 16000),
    "slin24": ("pcm", 24000),
    "slin44": ("pcm", 44100),
    "slin48": ("pcm", 48000),
}
ASTERISK_MAX_MESSAGE = 65000  # chan_websocket closes the call on messages over 65500 bytes
ASTERISK_START_WAIT = 10.0


def asterisk_event(text: str) -> dict[str, Any]:
    """A chan_websocket event, in either control format: JSON, or 'NAME key:value key:value'."""
    if text.lstrip().startswith("{"):
        event = server.parse_json(text)
        event["json"] = True
        return event
    if not text.strip():
        raise ApiError(400, "An empty event.", code="invalid_message")
    name, *pairs = text.split()
    return {
        "event": name,
        **dict(pair.split(":", 1) for pair in pairs if ":" in pair),
        "args": [pair for pair in pairs if ":" not in pair],
    }


class AsteriskSession(CallSession):
    """Asterisk's chan_websocket (Asterisk as the client, per websocket_client.conf): after
    MEDIA_START, speech leaves as binary media in the negotiated codec between START_ and
    STOP_MEDIA_BUFFERING (Asterisk frames and times it), held back while Asterisk says MEDIA_XOFF;
    the call is hung up once the last speech has played (MEDIA_BUFFERING_COMPLETED)."""

    subprotocol = "media"

    def __init__(self, websocket: WebSocket, app_state: AppState):
        super().__init__(websocket, app_state)
        self.started = False
        self.json = False
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.hangup_after: str | None = None  # the utterance whose completion ends the call

    async def read_messages(self) -> None:
        try:
            check_key(self.app_state, server.presented_key(self.websocket.scope))
            message = await server.within(ASTERISK_START_WAIT, self.websocket.receive())
            if message["type"] == "websocket.disconnect":
                return
            await self.receive(message.get("text"), message.get("bytes"))
            if not self.started:
                raise ApiError(400, "chan_websocket starts with MEDIA_START.", code="not_started")
        except (ApiError, TimeoutError) as exc:
            reason = exc.message if isinstance(exc, ApiError) else "No MEDIA_START."
            logger.warning("asterisk websocket: {}", reason)
            if self.websocket.application_state == WebSocketState.CONNECTED:
                await self.command("HANGUP")
                await self.websocket.close(1008, reason[:120])
            self.closing = True
            return
        await super().read_messages()

    async def receive(self, text: str | None, data: bytes | None) -> None:
        if text is None:
            return  # the caller's audio
        try:
            event = asterisk_event(text)
        except ApiError as exc:
            logger.warning("asterisk websocket: {}", exc.message)
            return
        name = event.get("event")
        if name == "MEDIA_START" and not self.started:
            await self.start(event)
        elif name == "MEDIA_XOFF":
            self.flowing.clear()
        elif name == "MEDIA_XON":
            self.flowing.set()
        elif name == "MEDIA_BUFFERING_COMPLETED":
            done = event.get("correlation_id") or next(iter(event.get("args", [])), None)
            if self.hangup_after is not None and done in (self.hangup_after, None):
                await self.command("HANGUP")
                self.closing = True
        # DTMF_END, STATUS, QUEUE_DRAINED and the rest: nothing to do

    async def start(self, event: dict[str, Any]) -> None:
        self.json = bool(event.get("json"))  # answer in the control format Asterisk uses
        codec = str(event.get("format", ""))
        if codec not in ASTERISK_CODECS:
            raise ApiError(
                400,
                f"Codec {codec!r} is not spoken here; use one of {', '.join(ASTERISK_CODECS)}.",
                param="format",
                code="unsupported_format",
            )
        self.fmt, self.rate = ASTERISK_CODECS[codec]
        self.started = True
        query = dict(self.websocket.query_params)
        self.call = call_id(query["call"]) if query.get("call") else None
        script = call_scripts(self.app_state).take(self.call) if self.call else None
        first = server.parse_model(CallSpeech, query) if query.get("text") else None
        if script is None and first is None:
            raise ApiError(
                400,
                "Nothing to say: give ?text= or ?call=<uuid> registered through POST /v1/telephony/audiosocket/<uuid>.",
                code="nothing_to_say",
            )
        await self.start_script(script, first)

    async def stream(self, utterance: Utterance) -> None:
        await self.command("START_MEDIA_BUFFERING")
        async for data in utterance.audio():
            for i in range(0, len(data), ASTERISK_MAX_MESSAGE):
                await self.until_flowing()
                await self.send(self.websocket.send_bytes(data[i : i + ASTERISK_MAX_MESSAGE]))
        if self.hangs_up_after(utterance):
            self.hangup_after = utterance.id
        await self.command("STOP_MEDIA_BUFFERING", correlation_id=utterance.id)

    async def until_flowing(self) -> None:
        """Wait out Asterisk's MEDIA_XOFF; one that lasts STREAM_SEND_TIMEOUT is a client that reads nothing."""
        seconds = self.app_state.settings.stream_send_timeout
        try:
            await server.within(seconds, self.flowing.wait())
        except TimeoutError:
            logger.warning(
                "asterisk websocket: MEDIA_XOFF for {:g} s (STREAM_SEND_TIMEOUT), the call is ended", seconds
            )
            raise server.ClientStalled() from None

    async def finished(self, utterance: Utterance, error: Exception | None) -> None:
        if isinstance(error, ApiError):  # any other failure was logged, with its traceback, as it happened
            logger.warning("asterisk websocket: {}", error.message)

    async def command(self, name: str, **fields: str) -> None:
        if self.json:
            await self.send_json({"command": name, **fields})
        else:
            await self.send(self.websocket.send_text(" ".join([name, *fields.values()])))


# --- Twilio Media Streams: a phone call hears the speech ---------------------------------------

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

    async def read_messages(self) -> None:
        """SpeechSession's, once the stream has started: a valid `start` (its key checked) must come within
        INPUT_TIMEOUT of the socket's opening, whatever else comes first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.app_state.settings.input_timeout
        while not self.closing and self.stream_sid is None:
            try:
                message = await server.within(deadline - loop.time(), self.websocket.receive())
            except TimeoutError:
                await self.not_started()
                return
            if message["type"] == "websocket.disconnect":
                return
            await self.receive(message.get("text"), message.get("bytes"))
        await super().read_messages()

    async def not_started(self) -> None:
        timeout = self.app_state.settings.input_timeout
        exc = ApiError(
            408, f"No valid 'start' within {timeout:g} s (INPUT_TIMEOUT).", param="event", code="input_timeout"
        )
        await self.send_json({"event": "error", "streamSid": None, "error": server.error_body(exc)})
        self.closing, self.close_code = True, 1008

    async def receive(self, text: str | None, data: bytes | None) -> None:
        try:
            message = server.ws_message(text)
            event = message.get("event")
            if event not in self.EVENTS:
                raise ApiError(
                    400,
                    f"Unknown event {event!r}; send start, speak, clear or stop (Twilio's connected, "
                    "media, mark and dtmf are accepted and ignored).",
                    param="event",
                    code="invalid_message",
                )
            if event == "start":
                await self.start(message)
            elif event == "stop":
                self.closing = True
            elif event in self.TWILIO_EVENTS:
                return
            elif self.stream_sid is None:
                raise ApiError(
                    409,
                    f"'{event}' before 'start': the stream has no streamSid yet.",
                    param="event",
                    code="not_started",
                )
            elif event == "speak":
                await self.say(server.parse_model(TwilioSpeech, {**self.defaults, **message}))
            else:
                await self.clear()
        except ApiError as exc:
            await self.send_json({"event": "error", "streamSid": self.stream_sid, "error": server.error_body(exc)})

    async def start(self, message: dict[str, Any]) -> None:
        if self.stream_sid is not None:
            raise ApiError(409, "The stream has already started.", param="event", code="already_started")
        start = message.get("start")
        start = start if isinstance(start, dict) else {}
        custom = start.get("customParameters")
        custom = {} if custom is None else custom
        sid = message.get("streamSid") or start.get("streamSid")
        if not start or not isinstance(custom, dict) or not isinstance(sid, str) or not sid:
            raise ApiError(
                400,
                "'start' needs a streamSid and a start object (customParameters, if any, an object).",
                param="start",
                code="invalid_message",
            )
        self.stream_sid = sid
        fields = {**self.websocket.query_params, **custom}
        try:  # settings that cannot speak end the stream, so that the call goes on to the next TwiML verb
            self.authorize(str(custom.get("token") or server.presented_key(self.websocket.scope)))
            speech = server.parse_model(TwilioSpeech, fields)
            await self.job(speech)
            if speech.text:
                await self.say(speech)
        except ApiError:
            self.closing, self.close_code = True, 1008
            raise
        self.defaults = {name: value for name, value in fields.items() if name not in ("text", "id", "token")}

    def authorize(self, token: str) -> None:
        # Twilio sends no headers and drops the URL's query string: the key may come as <Parameter name="token">.
        key = self.app_state.settings.api_key
        if key and not server.key_matches(token, key):
            raise ApiError(
                401,
                'Missing or invalid API key: add <Parameter name="token" value="<key>"/> to the <Stream>.',
                param="token",
                code="invalid_api_key",
            )

    async def job(self, speech: TwilioSpeech, reading: server.Reading | None = None) -> SpeechJob:
        job = await self.realtime_job(speech, "ulaw", reading)
        if (job.output.fmt.name, job.output.rate) != ("ulaw", 8000):
            raise ApiError(
                400,
                "Twilio Media Streams carry 8 kHz mu-law: leave response_format, output_format and sample_rate out.",
                param="response_format",
                code="unsupported_format",
            )
        return job

    def in_flight(self, adding: str) -> int:
        """Speeches (each one `speak`, its sentences `<speech>.<n>`) in flight once `adding` joins."""
        return len({mark.split(".")[0] for mark in [*self.active, adding]})

    async def say(self, speech: TwilioSpeech) -> None:
        settings = self.app_state.settings
        started = time.perf_counter()
        reading = server.text_reading(speech, self.app_state)
        per_sentence = functools.partial(  # one model call per sentence (a long one cut), pauses with the next
            server.speech_script, speech.text, settings, reading, server.ssml_of(speech), param="text", pack=False
        )
        items = await asyncio.to_thread(per_sentence)
        sentences: list[list[server.ScriptItem]] = [[]]
        for item in items:
            sentences[-1].append(item)
            if isinstance(item, server.TextChunk):
                sentences.append([])
        sentences = [sentence for sentence in sentences if sentence]
        text_seconds = (time.perf_counter() - started) / len(sentences)
        job = await self.job(speech, reading)
        name = speech.id or str(next(self.numbers))
        if any(mark.split(".")[0] == name for mark in self.active):
            raise ApiError(
                409, f"Speech {name!r} is still being spoken; use a new id.", param="id", code="duplicate_id"
            )

        async def sentence_job() -> SpeechJob:
            return job.copy()

        for n, chunks in enumerate(sentences, 1):  # the first sentence takes the speech's room; the rest, none
            await self.open_utterance(
                f"{name}.{n}",
                sentence_job,
                functools.partial(self.say_sentence, chunks=chunks, text_seconds=text_seconds),
            )

    @staticmethod
    async def say_sentence(utterance: Utterance, chunks: list[server.ScriptItem], text_seconds: float) -> None:
        utterance.job.timeline.text_seconds = text_seconds
        utterance.queue_chunks(chunks)
        utterance.ended = True
        utterance.feed.put_nowait(None)

    async def clear(self) -> None:
        """Barge-in: drop the queued sentences, stop the one being spoken, then have Twilio drop its buffer."""
        running = [u.task for u in self.active.values() if u.task is not None]
        for utterance in list(self.active.values()):
            await self.cancel(utterance)
        await asyncio.gather(*running, return_exceptions=True)  # no media of theirs can follow the clear
        await self.send_event("clear")

    async def stream(self, utterance: Utterance) -> None:
        # Every frame is 20 ms (the last padded with silence), so the mark falls after the sentence.
        async for frame in fixed_frames(utterance.audio(), TWILIO_FRAME_BYTES, ULAW_SILENCE):
            await self.send_media(frame)
        await self.send_event("mark", mark={"name": utterance.id})

    async def finished(self, utterance: Utterance, error: Exception | None) -> None:
        if error is not None:  # a sentence that completes or is cleared already said so with its mark or the clear
            await self.send_json(
                {
                    "event": "error",
                    "streamSid": self.stream_sid,
                    "mark": utterance.id,
                    "error": server.error_body(error),
                }
            )

    async def send_media(self, frame: bytes) -> None:
        await self.send_event("media", media={"payload": base64.b64encode(frame).decode()})

    async def send_event(self, event: str, **fields: Any) -> None:
        await self.send_json({"event": event, "streamSid": self.stream_sid, **fields})


# --- Routes and TCP servers --------------------------------------------------------------------


async def elevenlabs_websocket(websocket: WebSocket) -> None:
    await server.serve_session(websocket, ElevenLabsSession)


async def elevenlabs_multi_websocket(websocket: WebSocket) -> None:
    await server.serve_session(websocket, ElevenLabsMultiSession)


async def cartesia_websocket(websocket: WebSocket) -> None:
    await server.serve_session(websocket, CartesiaSession)


async def asterisk_websocket(websocket: WebSocket) -> None:
    await server.serve_session(websocket, AsteriskSession)


async def twilio_websocket(websocket: WebSocket) -> None:
    await server.serve_session(websocket, TwilioSession)


ELEVENLABS_TTS = "/v1/text-to-speech/{voice_id}"
# Routes that check the API key the protocol's own way (ApiKeyAuth lets them through).
KEY_IN_SESSION: list[BaseRoute] = [
    vendor_route(ELEVENLABS_TTS, elevenlabs_speech, elevenlabs_error),
    vendor_route(f"{ELEVENLABS_TTS}/stream", elevenlabs_speech, elevenlabs_error),
    vendor_route(f"{ELEVENLABS_TTS}/with-timestamps", elevenlabs_timestamps, elevenlabs_error),
    vendor_route(f"{ELEVENLABS_TTS}/stream/with-timestamps", elevenlabs_timestamps, elevenlabs_error),
    WebSocketRoute(f"{ELEVENLABS_TTS}/stream-input", elevenlabs_websocket),
    WebSocketRoute(f"{ELEVENLABS_TTS}/multi-stream-input", elevenlabs_multi_websocket),
    vendor_route("/v1/voices", elevenlabs_voices, elevenlabs_error, "GET"),
    vendor_route("/v2/voices", elevenlabs_voices_v2, elevenlabs_error, "GET"),
    vendor_route("/v1/voices/{voice_id}", elevenlabs_voice_by_id, elevenlabs_error, "GET"),
    vendor_route("/tts/bytes", cartesia_bytes, cartesia_error),
    vendor_route("/tts/sse", cartesia_sse, cartesia_error),
    vendor_route("/voices", cartesia_voices, cartesia_error, "GET"),
    vendor_route("/voices/{voice_id}", cartesia_voice_by_id, cartesia_error, "GET"),
    WebSocketRoute("/tts/websocket", cartesia_websocket),
    WebSocketRoute("/v1/telephony/asterisk", asterisk_websocket),
    WebSocketRoute("/v1/telephony/twilio", twilio_websocket),  # the key comes in its `start` message
]


def protocol() -> ProtocolPlugin:
    """This module's protocols, as the server plugs them in: its routes, the TCP servers that run with
    the app, and what calls are to say."""
    return ProtocolPlugin(
        name=__name__,
        self_checked=KEY_IN_SESSION,
        serving=TcpServers,
        state=CallScripts(),
        routes=[Route("/v1/telephony/audiosocket/{uuid}", register_call_speech, methods=["POST"])],
    )


class TcpServers:
    """The protocols that are not HTTP: Wyoming and AudioSocket, each on its port when one is set;
    they run with the app (an async context manager)."""

    def __init__(self, app_state: AppState):
        self.app_state = app_state
        self.wyoming: AsyncTcpServer | None = None
        self.audiosocket: asyncio.Server | None = None
        self.calls: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TcpServers:
        settings = self.app_state.settings
        if settings.wyoming_port:
            self.wyoming = AsyncTcpServer(settings.host, settings.wyoming_port)
            await self.wyoming.start(lambda reader, writer: WyomingHandler(reader, writer, self.app_state))
            logger.info("wyoming: listening on {}:{}", settings.host, settings.wyoming_port)
        if settings.audiosocket_port:
            self.audiosocket = await asyncio.start_server(
                self.audiosocket_call, settings.host, settings.audiosocket_port
            )
            logger.info("audiosocket: listening on {}:{}", settings.host, settings.audiosocket_port)
        return self

    async def audiosocket_call(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.calls.add(task)
        try:
            await serve_tcp(AudioSocketSession(reader, writer, self.app_state), writer)
        finally:
            self.calls.discard(task)

    async def __aexit__(self, *exc_info: object) -> None:
        if self.wyoming is not None:
            await self.wyoming.stop()
        if self.audiosocket is not None:
            self.audiosocket.close()
            for task in list(self.calls):
                task.cancel()
            await asyncio.gather(*self.calls, return_exceptions=True)


async def serve_tcp(session: WyomingSession | AudioSocketSession, writer: asyncio.StreamWriter) -> None:
    """One Wyoming or AudioSocket connection, counted in MAX_CONNECTIONS: when the server is full it is
    closed at once (ConnectionLimit logs it). A client that leaves or reads nothing just ends it."""
    connections = session.app_state.connections
    if not connections.enter():
        writer.close()
        return
    try:
        await session.run()
    except (ConnectionError, server.ClientStalled):
        pass
    except Exception:  # a bug: logged once here, not left in the task for asyncio to report
        logger.exception("{}: the connection failed", session.route)
    finally:
        connections.leave()
        writer.close()
