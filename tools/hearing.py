"""An offline ear (pocketsphinx's English model) on what the server says: how well text is read (words heard
against the intended spoken form, with the text front-end's normalization on and off) and how close the
server's word timestamps fall to where the recognizer places the same words.

python tools/hearing.py [--url http://127.0.0.1:8000] [--rounds 3]   # without --url: starts a Piper server
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import statistics
import subprocess
import sys
import time
import wave
from typing import Any

import httpx
import numpy as np

EAR_RATE = 16000  # what the acoustic model was trained on
FRAME_SECONDS = 0.01

# Written forms, and what a person reads aloud. The spoken forms use words the recognizer's dictionary has.
CORPUS = [
    ("It costs $5.20 today.", "it costs five dollars and twenty cents today"),
    ("The meeting is at 3:45pm.", "the meeting is at three forty five p m"),
    ("We drove 5 km to the lake.", "we drove five kilometers to the lake"),
    ("Dr. Smith will see you now.", "doctor smith will see you now"),
    ("She came 1st in the race.", "she came first in the race"),
    ("The price rose by 12%.", "the price rose by twelve percent"),
    ("I was born in 1987.", "i was born in nineteen eighty seven"),
    ("Send it to support@example.com please.", "send it to support at example dot com please"),
    ("The file is 250 MB.", "the file is two hundred fifty megabytes"),
    ("Water boils at 100 °C.", "water boils at one hundred degrees celsius"),
    ("He paid €1,500 for it.", "he paid one thousand five hundred euros for it"),
    ("Open www.example.com now.", "open example dot com now"),
    ("It is due on 12/05.", "it is due on december fifth"),
    ("Call me on 555-0100.", "call me on five five five zero one zero zero"),
    ("Read pages 10-20 tonight.", "read pages ten to twenty tonight"),
    ("Mr. Jones has 3 cats.", "mister jones has three cats"),
]
# Plain sentences for word timings: every word in the dictionary, nothing to normalize.
TIMING_TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river.",
    "Please call the office before noon tomorrow morning.",
    "We walked along the quiet beach and watched the boats come home.",
]


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def decoder() -> Any:
    from pocketsphinx import Decoder

    return Decoder(samprate=EAR_RATE, loglevel="FATAL")


def clean(word: str) -> str:
    """A recognizer's word as plain text: alternate pronunciations ("the(2)") and dots ("p.") dropped."""
    return re.sub(r"\(\d+\)$", "", word).replace(".", "").lower()


def hear(samples: np.ndarray) -> list[tuple[str, float, float]]:
    """What the recognizer hears in 16 kHz audio: (word, start, end) in seconds, fillers left out."""
    ear = decoder()
    ear.start_utt()
    ear.process_raw(pcm16(samples), full_utt=True)
    ear.end_utt()
    return [
        (clean(s.word), s.start_frame * FRAME_SECONDS, (s.end_frame + 1) * FRAME_SECONDS)
        for s in ear.seg()
        if not s.word.startswith(("<", "[")) and s.word != "<sil>"
    ]


def align(samples: np.ndarray, words: list[str]) -> list[tuple[str, float, float]] | None:
    """Where the recognizer places the given words in 16 kHz audio (forced alignment); None if it cannot."""
    ear = decoder()
    try:
        ear.set_align_text(" ".join(words))
        ear.start_utt()
        ear.process_raw(pcm16(samples), full_utt=True)
        ear.end_utt()
    except (RuntimeError, ValueError):
        return None
    placed = [
        (clean(s.word), s.start_frame * FRAME_SECONDS, (s.end_frame + 1) * FRAME_SECONDS)
        for s in ear.seg()
        if not s.word.startswith(("<", "["))
    ]
    return placed if [w for w, _, _ in placed] == words else None


def word_errors(heard: list[str], intended: list[str]) -> int:
    """Edit distance in words."""
    row = list(range(len(intended) + 1))
    for i, word in enumerate(heard, 1):
        previous, row[0] = row[0], i
        for j, target in enumerate(intended, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != target))
    return row[-1]


def read_wav(data: bytes) -> np.ndarray:
    """The server's streamed WAV (its sizes open-ended) as float samples."""
    with wave.open(io.BytesIO(data)) as header:
        assert header.getframerate() == EAR_RATE
    return np.frombuffer(data[44:], "<i2").astype(np.float32) / 32768


def timestamped(url: str, text: str, **fields: Any) -> dict[str, Any]:
    """The server's /v1/audio/speech/timestamps answer for text, its audio as 16 kHz samples."""
    body = {"input": text, "response_format": "wav", "sample_rate": EAR_RATE, "seed": 1, **fields}
    answer = httpx.post(f"{url}/v1/audio/speech/timestamps", json=body, timeout=300)
    answer.raise_for_status()
    result = answer.json()
    result["samples"] = read_wav(base64.b64decode(result["audio"]))
    return result


def normalized_words(result: dict[str, Any]) -> list[tuple[str, float]]:
    """The words of the text as the engine read it, each with its start, from the normalized alignment."""
    alignment = result["normalized_alignment"]
    words: list[tuple[str, float]] = []
    current, start = "", 0.0
    for char, at in zip(alignment["characters"], alignment["character_start_times_seconds"]):
        if char.isspace():
            if current:
                words.append((current, start))
            current = ""
            continue
        if not current:
            start = at
        current += char
    if current:
        words.append((current, start))
    return [(cleaned, at) for word, at in words if (cleaned := re.sub(r"[^\w']", "", word).lower())]


def reading_errors(url: str, normalization: str) -> tuple[int, int]:
    """Word errors over the corpus with normalization on or off, and the corpus's words."""
    errors = total = 0
    for text, spoken in CORPUS:
        heard = [w for w, _, _ in hear(timestamped(url, text, text_normalization=normalization)["samples"])]
        errors += word_errors(heard, spoken.split())
        total += len(spoken.split())
    return errors, total


def timing_offsets(url: str, texts: list[str]) -> list[float]:
    """Server word start minus recognizer word start, seconds, for every word it could align."""
    offsets = []
    for text in texts:
        result = timestamped(url, text)
        words = normalized_words(result)
        placed = align(result["samples"], [w for w, _ in words])
        if placed is not None:
            offsets += [at - start for (_, at), (_, start, _) in zip(words, placed)]
    return offsets


def start_piper_server() -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = {**os.environ, "TTS_MODEL": "piper", "PORT": str(port), "HOST": "127.0.0.1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(root, "server.py")], env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the Piper server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start a Piper server)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the reading check, normalization alternating")
    args = parser.parse_args()
    proc, url = (None, args.url) if args.url else start_piper_server()
    try:
        rates: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(args.rounds):
            for normalization in ("off", "on"):
                errors, total = reading_errors(url, normalization)
                rates[normalization].append(errors / total)
        offsets = timing_offsets(url, TIMING_TEXTS + [text for text, _ in CORPUS])
        engine = httpx.get(f"{url}/v1/status", timeout=30).json().get("engine", {})
        print(f"engine: {engine.get('engine')} ({engine.get('timings', '?')} timestamps)")
        print("| check | normalization off | normalization on |")
        print("| --- | --- | --- |")
        off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
        print(
            f"| word error rate vs the spoken form ({len(CORPUS)} sentences, median of {args.rounds}) "
            f"| {off:.1%} | {on:.1%} |"
        )
        absolute = [abs(o) for o in offsets]
        print(
            f"\nword starts vs the recognizer's ({len(offsets)} words): median |offset| "
            f"{1000 * statistics.median(absolute):.0f} ms, median offset {1000 * statistics.median(offsets):+.0f} ms, "
            f"90th percentile |offset| {1000 * sorted(absolute)[int(0.9 * len(absolute))]:.0f} ms"
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
