"""Drive the vendors' official Python SDKs (`elevenlabs`, `cartesia`) against a running server, every call
their users make first, and write what came back: the audio of each call as a file in --out, and one JSON
object on stdout (per call: its files, timings, voice ids, errors as the SDK raised them).

cartesia[websockets] pins websockets<16 and this project pins 17.4, so the SDKs live in a virtualenv of
their own (sdk_test.py builds it from tools/sdk-requirements.txt):

    python3 -m venv .cache/sdk-venv && .cache/sdk-venv/bin/pip install -r tools/sdk-requirements.txt
    .cache/sdk-venv/bin/python tools/sdk_check.py --url http://127.0.0.1:8000 --out /tmp/sdk

sdk_test.py decodes and checks the audio; this script only calls and records (it imports nothing of the
project's).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

TEXT = "Hello there. The library opens at nine in the morning, and closes at six."
VOICE = "alloy"


def elevenlabs_calls(url: str, key: str, out: Path) -> dict[str, Any]:
    from elevenlabs.client import ElevenLabs
    from elevenlabs.core.api_error import ApiError

    client = ElevenLabs(api_key=key, base_url=url, timeout=300)
    tts = client.text_to_speech
    found: dict[str, Any] = {}

    (out / "el_convert.mp3").write_bytes(b"".join(tts.convert(VOICE, text=TEXT, model_id="eleven_flash_v2_5")))
    found["convert"] = {"file": "el_convert.mp3"}

    answer = tts.convert_with_timestamps(VOICE, text=TEXT)
    (out / "el_timestamps.mp3").write_bytes(base64.b64decode(answer.audio_base_64))
    alignment = answer.alignment
    found["convert_with_timestamps"] = {
        "file": "el_timestamps.mp3",
        "characters": "".join(alignment.characters) if alignment else None,
        "starts": list(alignment.character_start_times_seconds) if alignment else [],
        "ends": list(alignment.character_end_times_seconds) if alignment else [],
    }

    (out / "el_stream.mp3").write_bytes(b"".join(tts.stream(VOICE, text=TEXT, output_format="mp3_22050_32")))
    found["stream"] = {"file": "el_stream.mp3"}

    pieces = list(tts.stream_with_timestamps(VOICE, text=TEXT))
    audio = b"".join(base64.b64decode(p.audio_base_64) for p in pieces if p.audio_base_64)
    (out / "el_stream_timestamps.mp3").write_bytes(audio)
    chars = [c for p in pieces if p.alignment for c in p.alignment.characters]
    found["stream_with_timestamps"] = {"file": "el_stream_timestamps.mp3", "characters": "".join(chars)}

    voices = client.voices.get_all()
    found["voices.get_all"] = {"ids": [v.voice_id for v in voices.voices], "names": [v.name for v in voices.voices]}
    pages, token = [], None
    while True:
        page = client.voices.search(page_size=5, next_page_token=token, include_total_count=True)
        pages.append({"ids": [v.voice_id for v in page.voices], "has_more": page.has_more, "total": page.total_count})
        token = page.next_page_token
        if not page.has_more or len(pages) > 20:
            break
    searched = client.voices.search(search=VOICE)
    found["voices.search"] = {"pages": pages, "search": [v.voice_id for v in searched.voices]}
    voice = client.voices.get(VOICE)
    found["voices.get"] = {"voice_id": voice.voice_id, "name": voice.name, "description": voice.description}

    for call, run in {
        "unknown_voice": lambda: b"".join(tts.convert("nobody-here", text=TEXT)),
        "unknown_voice_get": lambda: client.voices.get("nobody-here"),
    }.items():
        try:
            run()
            found[call] = {"raised": None}
        except ApiError as exc:
            found[call] = {"raised": type(exc).__name__, "status": exc.status_code, "body": exc.body}
    return found


RAW_S16 = {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 24000}


def cartesia_calls(url: str, ws_url: str, key: str, out: Path) -> dict[str, Any]:
    from cartesia import APIStatusError, Cartesia

    client = Cartesia(api_key=key, base_url=url, websocket_base_url=ws_url, timeout=300)
    found: dict[str, Any] = {}
    voice = {"mode": "id", "id": VOICE}

    wav = {"container": "wav", "encoding": "pcm_s16le", "sample_rate": 24000}
    for name, extra in {"bytes": {}, "bytes_slow": {"speed": "slow"}, "bytes_fast": {"speed": "fast"}}.items():
        response = client.tts.generate(model_id="sonic-2", transcript=TEXT, voice=voice, output_format=wav, **extra)
        (out / f"ca_{name}.wav").write_bytes(response.read())
        found[name] = {"file": f"ca_{name}.wav"}
    # A plain voice id, as the SDK's types allow.
    response = client.tts.generate(model_id="sonic-2", transcript=TEXT, voice=VOICE, output_format=wav)
    (out / "ca_bytes_id.wav").write_bytes(response.read())
    found["bytes_voice_id"] = {"file": "ca_bytes_id.wav"}

    events = list(
        client.tts.generate_sse(
            model_id="sonic-2", transcript=TEXT, voice=voice, output_format=RAW_S16, add_timestamps=True
        )
    )
    audio = b"".join(base64.b64decode(e.data) for e in events if e.type == "chunk")
    (out / "ca_sse.pcm").write_bytes(audio)
    words = [w for e in events if e.type == "timestamps" for w in e.word_timestamps.words]
    found["generate_sse"] = {"file": "ca_sse.pcm", "types": [e.type for e in events], "words": words}

    with client.tts.websocket_connect() as connection:
        # The context helper: a complete sentence pushed alone, then the rest; its own fallback voice (a plain
        # id string) goes with no_more_inputs.
        context = connection.context(model_id="sonic-2", voice=voice, output_format=RAW_S16, add_timestamps=True)
        started = time.monotonic()
        context.push("Hello there. ")
        received, first, kinds, spoken = [], None, [], []
        for event in context.receive():
            kinds.append(event.type)
            if event.type == "chunk" and event.audio:
                received.append(event.audio)
                if first is None:
                    first = time.monotonic() - started
                    context.push("The library opens at nine in the morning, and closes at six.")
                    context.no_more_inputs()
            if event.type == "timestamps" and event.word_timestamps:
                spoken += event.word_timestamps.words
        (out / "ca_ws.pcm").write_bytes(b"".join(received))
        found["websocket"] = {"file": "ca_ws.pcm", "types": kinds, "first_audio_s": first, "words": spoken}

        # An error: the context gets it, with its context_id, and the client stops waiting.
        bad = connection.context(model_id="sonic-2", voice="nobody-here", output_format=RAW_S16)
        bad.push("Hello.", continue_=False)
        errors = [e.model_dump() for e in bad.receive() if e.type == "error"]
        found["websocket_error"] = {"errors": errors}

    listed = list(client.voices.list(limit=4))
    found["voices.list"] = {"ids": [v.id for v in listed], "descriptions": [v.description for v in listed]}
    try:
        client.tts.generate(model_id="sonic-2", transcript=TEXT, voice=voice, output_format=wav, speed="warp")
        found["bad_speed"] = {"raised": None}
    except APIStatusError as exc:
        found["bad_speed"] = {"raised": type(exc).__name__, "status": exc.status_code, "body": exc.body}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", default="unused", help="the server's API_KEY, if it has one")
    parser.add_argument("--out", type=Path, required=True, help="folder for the audio files")
    parser.add_argument("--vendor", choices=["elevenlabs", "cartesia", "both"], default="both")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    found: dict[str, Any] = {}
    if args.vendor in ("elevenlabs", "both"):
        found["elevenlabs"] = elevenlabs_calls(args.url, args.key, args.out)
    if args.vendor in ("cartesia", "both"):
        ws_url = args.url.replace("http", "ws", 1)
        found["cartesia"] = cartesia_calls(args.url, ws_url, args.key, args.out)
    json.dump(found, sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
