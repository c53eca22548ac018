"""Text read right and each word's time: the text front-end in the server, pauses, and the timings every
protocol that carries them sends (the front-end's own rules are in text_frontend_test.py)."""

from __future__ import annotations

import base64
import json
import statistics
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import server
from server import CharTime, SpokenText, TextChunk, TextMarks, TimingCursor
from testing import ServerProcess, WsClient, assert_openai_error, load_tool, speak, sse_events, stream_pcm


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


# --- end to end, in real server processes --------------------------------------------------------------------------


def zero_runs(samples: np.ndarray) -> list[int]:
    """Lengths of the runs of exactly silent samples."""
    silent = np.concatenate([[False], samples == 0, [False]])
    edges = np.flatnonzero(np.diff(silent.astype(np.int8)))
    return list(edges[1::2] - edges[::2])


def test_a_break_is_silence_of_exactly_its_length_in_a_stream(servers: dict[str, ServerProcess]) -> None:
    """An inline <break> (ElevenLabs' and Cartesia's convention, plain text) and an SSML one are digital
    silence of their length in the streamed audio, at the engine's rate and resampled."""
    srv = servers["piper"]
    for rate in (22050, 24000):
        pcm = stream_pcm(srv, input='One two three. <break time="700ms"/> Four five six.', sample_rate=rate)
        longest = max(zero_runs(np.frombuffer(pcm, "<i2")))
        assert abs(longest / rate - 0.7) <= 0.02, longest / rate
    ws = WsClient(srv)
    ws.send(type="speak", id="u", text='<speak>Yes.<break time="1s"/>No.</speak>', response_format="pcm")
    audio, messages = ws.until_done("u")
    ws.close()
    assert messages[-1]["type"] == "done"
    longest = max(zero_runs(np.frombuffer(audio, "<i2")))
    assert abs(longest / 24000 - 1.0) <= 0.02, longest / 24000


def test_malformed_ssml_is_a_400_naming_the_position_on_every_transport(servers: dict[str, ServerProcess]) -> None:
    srv = servers["piper"]
    bad = "<speak>Hello <prosody rate='slow'>there.</speak>"
    error = assert_openai_error(speak(srv, input=bad), 400, "input")
    assert "character" in error["message"] and "prosody" in error["message"], error
    error = assert_openai_error(speak(srv, input="Plain text.", text_type="ssml"), 400, "input")
    ws = WsClient(srv)
    ws.send(type="speak", id="u", text=bad)
    message = ws.recv()
    assert isinstance(message, dict) and message["type"] == "error" and message["code"] == "invalid_text"
    ws.send(type="speak", id="v", text="Still here.")  # the connection goes on
    assert ws.until_done("v")[1][-1]["type"] == "done"
    ws.close()
    eleven = httpx.post(f"{srv.url}/v1/text-to-speech/default", json={"text": 'Hi <break time="x"/>.'}, timeout=60)
    assert eleven.status_code == 400 and "break" in eleven.json()["detail"]["message"]
    lexicon = speak(srv, input="Hi.", lexicon=[{"pattern": "a+", "alias": "b"}])
    assert assert_openai_error(lexicon, 400, "lexicon")["code"] == "invalid_lexicon"


def spoken_words(words: list[dict[str, Any]]) -> list[str]:
    return [w["word"] for w in words]


def assert_rising(times: list[float]) -> None:
    assert times == sorted(times), times


def test_every_protocol_that_carries_timings_sends_the_engines(servers: dict[str, ServerProcess]) -> None:
    """Piper's measured timings reach the caller through ElevenLabs REST (one object, and lines) and its
    WebSocket, Cartesia's word timestamps, the OpenAI-style SSE and WebSocket and the timestamps endpoint
    (with captions): the caller's characters, and the normalized ones as ElevenLabs names them."""
    srv = servers["piper"]
    text = "It costs $5.20 today. Call me at 3:45pm."
    whole = httpx.post(f"{srv.url}/v1/text-to-speech/default/with-timestamps", json={"text": text}, timeout=120)
    assert whole.status_code == 200 and whole.headers["content-type"] == "application/json"
    answer = whole.json()  # one object, as ElevenLabs answers
    alignment, normalized = answer["alignment"], answer["normalized_alignment"]
    assert "".join(alignment["characters"]) == text
    assert "five dollars and twenty cents" in "".join(normalized["characters"])
    assert_rising(alignment["character_start_times_seconds"])
    assert_rising(normalized["character_start_times_seconds"])
    duration = len(base64.b64decode(answer["audio_base64"])) * 8 / 128_000  # mp3 at 128 kbit/s
    assert 0 < alignment["character_end_times_seconds"][-1] <= duration + 0.5
    cost = alignment["character_start_times_seconds"][text.index("$")]
    call = alignment["character_start_times_seconds"][text.index("Call")]
    assert 0.3 < cost < call  # measured, not spread: the words after "$5.20" start after it is read

    plain = httpx.post(
        f"{srv.url}/v1/text-to-speech/default/with-timestamps",
        json={"text": text, "apply_text_normalization": "off"},
        timeout=120,
    ).json()
    assert "".join(plain["normalized_alignment"]["characters"]) == text  # read as written

    lines = httpx.post(
        f"{srv.url}/v1/text-to-speech/default/stream/with-timestamps", json={"text": text}, timeout=120
    ).text.splitlines()
    streamed = [json.loads(line) for line in lines]
    assert "".join(c for line in streamed for c in line["alignment"]["characters"]) == text

    events = sse_events(srv, "/v1/audio/speech", {"input": text, "stream_format": "sse", "timestamps": True})
    words = [w for e in events if e["type"] == "speech.audio.timestamps" for w in e["words"]]
    assert spoken_words(words) == text.split() and events[-1]["type"] == "speech.audio.done"
    assert_rising([w["start"] for w in words])

    ws = WsClient(srv)
    ws.send(type="speak", id="u", text=text, timestamps=True)
    _, messages = ws.until_done("u")
    ws.close()
    assert spoken_words([w for m in messages if m["type"] == "timestamps" for w in m["words"]]) == text.split()

    stamped = httpx.post(f"{srv.url}/v1/audio/speech/timestamps", json={"input": text}, timeout=120).json()
    assert spoken_words(stamped["words"]) == text.split() and stamped["timestamps"] == "aligned"
    assert stamped["vtt"].startswith("WEBVTT\n\n00:00:") and "It costs $5.20 today." in stamped["vtt"]
    assert stamped["srt"].startswith("1\n00:00:") and "\n2\n" in stamped["srt"]


def test_turbo_sound_tags_reach_its_tokenizer_and_no_other_engine_speaks_them(
    servers: dict[str, ServerProcess], turbo_engine: server.ChatterboxEngine
) -> None:
    text = turbo_engine.loaded_text()
    tokenizer = text.tokenizer
    ids = text.ids("Well [laugh] that is funny.", None)[0].tolist()
    assert tokenizer.convert_tokens_to_ids("[laugh]") in ids  # one added token, not spelled out
    reading = server.Reading(keep_tags=turbo_engine.tags)
    chunks = server.speech_script("Hello. [sigh] Fine, $5. [laugh]", server.Settings(), reading, pack=False)
    # Kept as written; a tag is never a model call of its own, nor a sentence's end.
    assert [c.text for c in chunks if isinstance(c, TextChunk)] == ["Hello.", "[sigh] Fine, five dollars. [laugh]"]
    srv = servers["piper"]
    stamped = httpx.post(
        f"{srv.url}/v1/audio/speech/timestamps", json={"input": "Well [laugh] that is funny."}, timeout=120
    ).json()
    assert spoken_words(stamped["words"]) == ["Well", "that", "is", "funny."]
    assert "laugh" not in "".join(stamped["normalized_alignment"]["characters"])


def test_normalized_text_is_heard_as_it_is_meant(servers: dict[str, ServerProcess]) -> None:
    """An offline recognizer hears Piper read "$5.20" as five dollars and twenty cents once normalized, and
    something else without; across the whole reading corpus normalization leaves far fewer word errors."""
    ear = load_tool("hearing")
    srv = servers["piper"]
    text, spoken = ear.CORPUS[0]
    heard = [w for w, _, _ in ear.hear(ear.timestamped(srv.url, text)["samples"])]
    assert ear.word_errors(heard, spoken.split()) <= 1, heard
    raw = [w for w, _, _ in ear.hear(ear.timestamped(srv.url, text, text_normalization="off")["samples"])]
    assert ear.word_errors(raw, spoken.split()) >= 3, raw
    (off, total), (on, _) = ear.reading_errors(srv.url, "off"), ear.reading_errors(srv.url, "on")
    assert on < total * 0.2 and on * 2 < off, (on, off, total)


def test_word_timestamps_fall_where_the_recognizer_places_the_words(servers: dict[str, ServerProcess]) -> None:
    ear = load_tool("hearing")
    offsets = ear.timing_offsets(servers["piper"].url, ear.TIMING_TEXTS)
    assert len(offsets) >= 25
    assert statistics.median(abs(o) for o in offsets) <= 0.06, offsets


def test_timings_follow_speed_pieces_of_text_and_every_engine(servers: dict[str, ServerProcess]) -> None:
    """Speed divides every time; text given to the WebSocket in pieces keeps its own offsets; each engine's
    words come back in order, as measured ("aligned") or as Turbo's estimate, as /v1/status says."""
    srv = servers["piper"]
    text = "One two three four five six seven eight."
    normal, fast = (
        httpx.post(f"{srv.url}/v1/audio/speech/timestamps", json={"input": text, "speed": speed}, timeout=120).json()
        for speed in (1.0, 2.0)
    )
    ratio = fast["words"][-1]["start"] / normal["words"][-1]["start"]
    assert 0.4 < ratio < 0.6, ratio
    ws = WsClient(srv)
    ws.send(type="speak", id="u", text="First part, ", final=False, timestamps=True)
    ws.send(type="append", id="u", text="then more. And the end.")
    ws.send(type="end", id="u")
    _, messages = ws.until_done("u")
    ws.close()
    words = [w for m in messages if m["type"] == "timestamps" for w in m["words"]]
    assert spoken_words(words) == "First part, then more. And the end.".split()
    assert_rising([w["start"] for w in words])
    for kind, timings in (("standard", "aligned"), ("multilingual", "aligned"), ("turbo", "estimated")):
        chatterbox = servers[kind]
        assert httpx.get(f"{chatterbox.url}/v1/status", timeout=30).json()["engine"]["timings"] == timings
        stamped = httpx.post(
            f"{chatterbox.url}/v1/audio/speech/timestamps",
            json={"input": "Hello there, friend.", "seed": 3},
            timeout=300,
        ).json()
        assert spoken_words(stamped["words"]) == ["Hello", "there,", "friend."] and stamped["timestamps"] == timings
        assert_rising([w["start"] for w in stamped["words"]])


def test_pronunciation_rules_from_the_request_and_the_file(servers: dict[str, ServerProcess], tmp_path: Path) -> None:
    srv = servers["piper"]
    stamped = httpx.post(
        f"{srv.url}/v1/audio/speech/timestamps",
        json={"input": "Our SQL server.", "lexicon": [{"match": "sql", "alias": "sequel"}]},
        timeout=120,
    ).json()
    assert "".join(stamped["normalized_alignment"]["characters"]) == "Our sequel server."
    assert spoken_words(stamped["words"]) == ["Our", "SQL", "server."]  # the caller's words, timed
    rules = tmp_path / "lexicon.json"
    rules.write_text(json.dumps([{"pattern": r"\bk8s\b", "alias": "kubernetes"}]))
    lexicon = server.load_lexicon(str(rules))
    assert lexicon is not None
    chunks = server.speech_script("Run k8s now.", server.Settings(), server.Reading(lexicon=lexicon))
    assert [c.text for c in chunks if isinstance(c, TextChunk)] == ["Run kubernetes now."]
    rules.write_text(json.dumps([{"alias": "no match"}]))
    with pytest.raises(SystemExit, match="LEXICON_FILE"):
        server.load_lexicon(str(rules))


def test_ssml_prosody_and_phonemes_change_the_speech(servers: dict[str, ServerProcess]) -> None:
    """<prosody rate> stretches its stretch of speech (and its timings) without touching the rest; Piper
    reads a <phoneme>'s IPA instead of the word's letters."""
    srv = servers["piper"]

    def seconds(text: str) -> float:
        return len(stream_pcm(srv, input=text, response_format="pcm", seed=1)) / 2 / 24000

    plain = seconds("<speak>Good morning to you all.</speak>")
    slow = seconds('<speak><prosody rate="x-slow">Good morning to you all.</prosody></speak>')
    assert 1.6 < slow / plain < 2.4, (plain, slow)
    stamped = httpx.post(
        f"{srv.url}/v1/audio/speech/timestamps",
        json={"input": '<speak>Fast <prosody rate="x-slow">slow words here</prosody> fast again.</speak>'},
        timeout=120,
    ).json()
    assert spoken_words(stamped["words"]) == ["Fast", "slow", "words", "here", "fast", "again."]
    assert_rising([w["start"] for w in stamped["words"]])
    word = "<speak>I said <phoneme alphabet='ipa' ph='təˈmɑːtoʊ'>tomato</phoneme>.</speak>"
    other = "<speak>I said <phoneme alphabet='ipa' ph='təˈmeɪtoʊ'>tomato</phoneme>.</speak>"
    assert stream_pcm(srv, input=word, seed=1) != stream_pcm(srv, input=other, seed=1)
