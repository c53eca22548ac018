"""Whether Piper pays for batching: sentences of several requests through one padded ONNX run against one
run each, on the bundled voice, at 2/4/8 sentences at once (issue 27, point 4).

Each batch size takes that many sentences of a briefing, phonemized once; then, alternating, `--reps` times:
the sentences one run at a time, and all of them in one run (ids padded to the longest, with their lengths;
each sentence's audio is its own samples of the output, as the alignment output counts them). Prints audio
seconds per wall second of both, median and spread, and their ratio (over 1: batching computes more).

    .venv/bin/python tools/piper_batch.py --reps 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import server  # noqa: E402

SENTENCES = (
    "Good morning, and welcome to your daily briefing.",
    "The weather today is sunny with a light breeze.",
    "Temperatures will reach twenty two degrees by the afternoon.",
    "Your first meeting starts at nine thirty.",
    "Traffic on the way to the office is light.",
    "Three new messages arrived overnight.",
    "One of them is from your sister, who asks about the weekend.",
    "The package you ordered will arrive tomorrow.",
)


def run(session: object, ids: list[list[int]], scales: np.ndarray, hop: int) -> int:
    """One ONNX run over `ids` (padded): the samples of speech it made, each sentence's own counted."""
    width = max(map(len, ids))
    batch = np.zeros((len(ids), width), dtype=np.int64)
    for row, sentence in zip(batch, ids):
        row[: len(sentence)] = sentence
    lengths = np.array([len(sentence) for sentence in ids], dtype=np.int64)
    audio, id_samples = session.run(None, {"input": batch, "input_lengths": lengths, "scales": scales})  # type: ignore[attr-defined]
    counted = [hop * int(np.sum(id_samples[i, 0, : len(sentence)])) for i, sentence in enumerate(ids)]
    assert all(0 < n <= audio.shape[-1] for n in counted)
    return sum(counted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--sizes", default="2,4,8")
    args = parser.parse_args()
    engine = server.PiperEngine()
    engine.load()
    voice = engine.default
    session = voice.session
    config = voice.config
    scales = np.array([config.noise_scale, config.length_scale, config.noise_w_scale], dtype=np.float32)
    ids = [voice.phonemes_to_ids(voice.phonemize(text)[0]) for text in SENTENCES]  # one sentence each
    run(session, ids[:1], scales, config.hop_length)  # warm
    print("| sentences at once | one run each: audio s per s, median (min-max) | one batched run | ratio |")
    print("|---|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        chosen = ids[:size]
        rates: dict[str, list[float]] = {"each": [], "batched": []}
        for rep in range(args.reps):
            for how in ("each", "batched") if rep % 2 == 0 else ("batched", "each"):
                started = time.perf_counter()
                if how == "each":
                    samples = sum(run(session, [sentence], scales, config.hop_length) for sentence in chosen)
                else:
                    samples = run(session, chosen, scales, config.hop_length)
                rates[how].append(samples / engine.sample_rate / (time.perf_counter() - started))
        each, batched = (statistics.median(rates[h]) for h in ("each", "batched"))
        spread = {h: f"{min(r):.1f}-{max(r):.1f}" for h, r in rates.items()}
        print(
            f"| {size} | {each:.1f} ({spread['each']}) | {batched:.1f} ({spread['batched']}) | {batched / each:.2f}x |"
        )


if __name__ == "__main__":
    main()
