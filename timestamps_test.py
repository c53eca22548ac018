"""Text read right and each word's time: the text front-end in the server, pauses, and the timings every
protocol that carries them sends (the front-end's own rules are in text_frontend_test.py)."""

from __future__ import annotations

import numpy as np

import server
from server import CharTime, SpokenText, TextChunk, TextMarks, TimingCursor


def chunk(text: str, start: int) -> TextChunk:
    return TextChunk(text, tuple(range(start, start + len(text) + 1)))


def test_characters_are_placed_through_joins_pauses_speed_and_a_trimmed_lead() -> None:
    """Two model calls with a pause between: marks in each call's own samples land where the call's audio
    starts in the joined stream; speed divides and a trimmed lead shifts every time; the caller's
    characters get their normalized characters' times, and what was not spoken (the break) none."""
    text = 'Hello world. <break time="1s"/>Bye now.'
    spoken = SpokenText()
    spoken.add_original(text)
    spoken.rate, spoken.speed = 1000, 2.0
    first = server.ChunkPlacement(spoken, chunk("Hello world.", 0), 1000)
    first.mark(TextMarks(((0, 100), (6, 1100))))  # before its audio: kept until it starts
    first.stretched(np.zeros(2000, dtype=np.float32))
    first.begin(0)
    first.end(2000)
    second = server.ChunkPlacement(spoken, chunk("Bye now.", text.index("Bye")), 1000)
    second.begin(2980 + 1000)  # after the crossfade's held samples and a one-second pause
    second.mark(TextMarks(((0, 0), (4, 600)), kind="estimated"))
    second.stretched(np.zeros(1000, dtype=np.float32))
    spoken.lead = 0.05
    cursor = TimingCursor(spoken)
    original, normalized = cursor.take(0.51)  # what starts in the first 0.51 s sent
    assert "".join(c.char for c in normalized) == "Hello w"
    assert "".join(c.char for c in original) == "Hello w"
    h, w = normalized[0], normalized[6]
    assert (h.start, w.start) == (100 / 1000 / 2 - 0.05, 1100 / 1000 / 2 - 0.05)
    second.end(3980 + 1000)
    rest, rest_normalized = cursor.take(None)
    everything = original + rest
    assert "".join(c.char for c in everything) == text
    assert "".join(c.char for c in normalized + rest_normalized) == "Hello world. Bye now."
    bye = everything[text.index("Bye")]
    assert bye.start == 3980 / 1000 / 2 - 0.05 and bye.spoken
    markup = [c for c in everything if not c.spoken]
    assert "".join(c.char for c in markup) == ' <break time="1s"/>'  # with the space before it
    assert all(c.start == c.end == bye.start for c in markup)  # zero-length, where speech goes on
    starts = [c.start for c in everything]
    assert starts == sorted(starts) and all(c.end >= c.start for c in everything)
    assert spoken.kind == "estimated"  # one call's marks were


def test_words_and_captions_come_from_the_characters() -> None:
    chars = [CharTime(c, 0.1 * i, 0.1 * i + 0.1) for i, c in enumerate("Hi there. Bye")]
    words = server.Words().add(chars, final=True)
    assert [w for w, _, _ in words] == ["Hi", "there.", "Bye"]
    assert words[1][1:] == (0.30000000000000004, 0.9)
    cues = server.caption_cues(words)
    assert [text for _, _, text in cues] == ["Hi there.", "Bye"]  # a sentence ends a cue
    vtt, srt = server.webvtt(cues), server.srt(cues)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:00.900\nHi there.\n")
    assert srt == "1\n00:00:00,000 --> 00:00:00,900\nHi there.\n\n2\n00:00:01,000 --> 00:00:01,300\nBye\n\n"
    long = [(f"w{i}", i * 0.2, i * 0.2 + 0.2) for i in range(60)]
    assert all(len(text) <= server.CAPTION_MAX_CHARS for _, _, text in server.caption_cues(long))
