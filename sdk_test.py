"""The vendors' own SDKs against a real server, unchanged: the official `elevenlabs` and `cartesia` Python
SDKs (tools/sdk_check.py, from their own virtualenv: cartesia[websockets] pins websockets<16), every call
their users make first, with the audio decoded; Cartesia's message forms the SDKs do not send (speed, voice
and error shapes, a sentence pushed with `continue`); Home Assistant's voice labels over Wyoming; and the
server's own TLS (TLS_CERT, TLS_KEY) over HTTPS and WSS with a certificate made here.

One Piper server (no checkpoint to build) with an API key serves the SDK tests; the TLS test starts its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets.sync.client
from hypothesis import given
from hypothesis import settings as fuzzing
from hypothesis import strategies as st

import server
from testing import FUZZ, JUNK, ROOT, ServerProcess, end_with_parent, free_port, read_wav, serving

KEY = "sdk-s3cret"
SDK_VENV = ROOT / ".cache" / "sdk-venv"
SDK_REQUIREMENTS = ROOT / "tools" / "sdk-requirements.txt"
TEXT = "Hello there. The library opens at nine in the morning, and closes at six."  # tools/sdk_check.py's
RATE = 24000  # the rate the SDK calls ask for


def sdk_python() -> Path:
    """The SDKs' virtualenv, built from tools/sdk-requirements.txt when it is missing or out of date
    (`make install` builds it too)."""
    stamp = SDK_VENV / ".requirements"
    wanted = SDK_REQUIREMENTS.read_text()
    if not stamp.is_file() or stamp.read_text() != wanted:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(SDK_VENV)], check=True)
        pip = [str(SDK_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(SDK_REQUIREMENTS)], check=True)
        stamp.write_text(wanted)
    return SDK_VENV / "bin" / "python"


@pytest.fixture(scope="module")
def piper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        "piper", None, tmp_path_factory.mktemp("voices-sdk"), command=None, API_KEY=KEY, WYOMING_PORT=str(free_port())
    )
    with serving(srv):
        yield srv


def sdk_check(srv: ServerProcess, vendor: str, out: Path) -> dict[str, Any]:
    done = subprocess.run(
        [
            str(sdk_python()),
            str(ROOT / "tools" / "sdk_check.py"),
            *("--url", srv.url, "--key", KEY, "--vendor", vendor),
            *("--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=end_with_parent,
    )
    assert done.returncode == 0, f"{done.stderr}\n{srv.logs()[-4000:]}"
    return dict(json.loads(done.stdout)[vendor])


def seconds(path: Path) -> float:
    """The decoded length of an audio file the SDK wrote (raw files are s16 PCM at RATE)."""
    data = path.read_bytes()
    if path.suffix == ".pcm":
        return len(data) / 2 / RATE
    if path.suffix == ".wav":
        rate, pcm = read_wav(data)
        assert np.abs(pcm).max() > 0
        return len(pcm) / rate
    audio, rate = server.decode_audio(data)
    assert np.abs(audio).max() > 0
    return len(audio) / rate


def plausible(duration: float) -> bool:
    """TEXT's 14 words, as Piper says them at a normal pace (about 4.3 s)."""
    return 2.5 < duration < 8.0


def test_elevenlabs_sdk_speaks_times_and_lists_voices(piper: ServerProcess, tmp_path: Path) -> None:
    found = sdk_check(piper, "elevenlabs", tmp_path)
    for call in ("convert", "convert_with_timestamps", "stream", "stream_with_timestamps"):
        assert plausible(seconds(tmp_path / found[call]["file"])), call
    timed = found["convert_with_timestamps"]
    assert timed["characters"] == found["stream_with_timestamps"]["characters"] == TEXT
    assert timed["starts"] == sorted(timed["starts"]) and all(s <= e for s, e in zip(timed["starts"], timed["ends"]))
    assert abs(timed["ends"][-1] - seconds(tmp_path / timed["file"])) < 1.0  # the last character ends near the end

    ids = [voice["id"] for voice in httpx.get(f"{piper.url}/v1/audio/voices", headers=auth()).json()["data"]]
    assert found["voices.get_all"]["ids"] == ids and "Alloy" in found["voices.get_all"]["names"]
    pages = found["voices.search"]["pages"]
    assert [v for page in pages for v in page["ids"]] == ids  # every voice once, in pages of 5
    assert [page["has_more"] for page in pages] == [True] * (len(pages) - 1) + [False]
    assert {page["total"] for page in pages} == {len(ids)}
    assert found["voices.search"]["search"] == ["alloy"]
    assert found["voices.get"]["voice_id"] == "alloy" and "English" in found["voices.get"]["description"]
    for call in ("unknown_voice", "unknown_voice_get"):
        assert (found[call]["raised"], found[call]["status"]) == ("ApiError", 404), found[call]
        assert found[call]["body"]["detail"]["status"] == "voice_not_found"


def test_elevenlabs_voices_check_the_key_and_answer_bad_queries_in_their_shape(piper: ServerProcess) -> None:
    assert httpx.get(f"{piper.url}/v1/voices", timeout=60).status_code == 401
    assert httpx.get(f"{piper.url}/v2/voices", headers={"xi-api-key": "wrong"}, timeout=60).status_code == 401
    for query in ("page_size=0", "page_size=101", "next_page_token=abc", "sort_direction=up", "voice_type=x"):
        answer = httpx.get(f"{piper.url}/v2/voices?{query}", headers={"xi-api-key": KEY}, timeout=60)
        assert answer.status_code == 422 and answer.json()["detail"]["status"] == "invalid_value", query
    premade = httpx.get(f"{piper.url}/v2/voices?voice_type=default&page_size=100", headers={"xi-api-key": KEY})
    assert {v["category"] for v in premade.json()["voices"]} == {"premade"}
    personal = httpx.get(f"{piper.url}/v2/voices?voice_type=personal", headers={"xi-api-key": KEY}).json()
    assert (personal["voices"], personal["total_count"], personal["has_more"]) == ([], 0, False)


def test_cartesia_sdk_speaks_at_each_speed_streams_events_and_lists_voices(
    piper: ServerProcess, tmp_path: Path
) -> None:
    found = sdk_check(piper, "cartesia", tmp_path)
    normal, slow, fast = (seconds(tmp_path / found[c]["file"]) for c in ("bytes", "bytes_slow", "bytes_fast"))
    assert plausible(normal) and slow > normal * 1.15 and fast < normal * 0.9  # "slow" 0.75x, "fast" 1.25x
    assert abs(seconds(tmp_path / found["bytes_voice_id"]["file"]) - normal) < 0.05 * normal  # a plain id string
    words = TEXT.split()
    sse = found["generate_sse"]
    assert plausible(seconds(tmp_path / sse["file"])) and sse["types"][-1] == "done" and sse["words"] == words
    ws = found["websocket"]
    assert plausible(seconds(tmp_path / ws["file"])) and ws["types"][-1] == "done" and ws["words"] == words
    print(f"cartesia SDK: first audio of a pushed 'Hello there. ' after {ws['first_audio_s']:.3f} s")
    [error] = found["websocket_error"]["errors"]  # the context ends on its error: the SDK stops waiting
    assert (error["error_code"], error["done"]) == ("voice_not_found", True) and error["context_id"]
    ids = [voice["id"] for voice in httpx.get(f"{piper.url}/v1/audio/voices", headers=auth()).json()["data"]]
    assert found["voices.list"]["ids"] == ids  # every page of 4, followed by the SDK's cursor
    assert len(set(found["voices.list"]["descriptions"])) == len(ids)
    assert (found["bad_speed"]["status"], found["bad_speed"]["body"]["error_code"]) == (400, "invalid_value")


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


RAW = {"container": "raw", "encoding": "pcm_s16le", "sample_rate": RATE}


def cartesia_context(srv: ServerProcess, *messages: dict[str, Any], timeout: float = 120) -> list[dict[str, Any]]:
    """Send messages on one Cartesia socket; every event until each context they name is done or failed."""
    url = srv.url.replace("http", "ws", 1) + f"/tts/websocket?api_key={KEY}"
    events: list[dict[str, Any]] = []
    with websockets.sync.client.connect(url, open_timeout=60) as ws:
        for message in messages:
            ws.send(json.dumps(message))
        open_contexts = {m.get("context_id") for m in messages}
        while open_contexts:
            event = json.loads(ws.recv(timeout=timeout))
            events.append(event)
            if event["done"]:
                open_contexts.discard(event["context_id"])
    return events


def pcm_seconds(events: list[dict[str, Any]], context_id: str) -> float:
    chunks = [e["data"] for e in events if e["type"] == "chunk" and e["context_id"] == context_id]
    return sum(len(base64.b64decode(c)) for c in chunks) / 2 / RATE


def test_cartesia_every_speed_form_and_voice_form_on_the_websocket(piper: ServerProcess) -> None:
    base = {"model_id": "sonic-2", "transcript": TEXT, "output_format": RAW}
    forms: dict[str, dict[str, Any]] = {
        "plain": {"voice": "alloy"},
        "object": {"voice": {"mode": "id", "id": "alloy"}},
        "slow": {"voice": "alloy", "speed": "slow"},
        "number": {"voice": "alloy", "speed": 1.25},
        "generation_config": {"voice": "alloy", "generation_config": {"speed": 0.75}},
        "controls_word": {"voice": {"mode": "id", "id": "alloy", "__experimental_controls": {"speed": "fast"}}},
        "controls_number": {"voice": {"mode": "id", "id": "alloy", "__experimental_controls": {"speed": -0.5}}},
    }
    events = cartesia_context(piper, *({**base, **form, "context_id": name} for name, form in forms.items()))
    assert not [e for e in events if e["type"] == "error"]
    length = {name: pcm_seconds(events, name) for name in forms}
    same = lambda a, b: abs(a - b) < 0.05 * b  # noqa: E731 (contexts side by side are joined a little apart)
    assert plausible(length["plain"]) and same(length["object"], length["plain"]), length
    for slower in ("slow", "generation_config", "controls_number"):  # 0.75x each
        assert same(length[slower], length["slow"]) and length[slower] > length["plain"] * 1.15, length
    for faster in ("number", "controls_word"):  # 1.25x each
        assert same(length[faster], length["number"]) and length[faster] < length["plain"] * 0.9, length


@pytest.mark.parametrize(
    "bad",
    [
        {"voice": 7},
        {"voice": {"mode": "embedding", "embedding": [0.1, 0.2]}},
        {"voice": "alloy", "speed": "warp"},
        {"voice": "alloy", "speed": 9},
        {"voice": {"mode": "id", "id": "alloy", "__experimental_controls": {"speed": 3}}},
        {"voice": "alloy", "generation_config": {"speed": 0}},
        {"voice": "nobody-here"},
        {"voice": "alloy", "output_format": {"container": "raw", "encoding": "opus", "sample_rate": RATE}},
    ],
)
def test_cartesia_errors_name_the_field_and_end_their_context(piper: ServerProcess, bad: dict[str, Any]) -> None:
    message = {"model_id": "sonic-2", "transcript": "Hi.", "output_format": RAW, **bad, "context_id": "ctx-1"}
    [error] = cartesia_context(piper, message)  # a context_id even when the message is not a valid request
    assert (error["type"], error["done"], error["context_id"], error["status_code"]) == ("error", True, "ctx-1", 400)
    assert "Cartesia" not in error["message"] and "Voice'" not in error["message"], error  # no class of ours


CARTESIA_VOICES = st.one_of(
    st.sampled_from(["alloy", "nobody", ""]),
    st.fixed_dictionaries(
        {"mode": st.one_of(st.sampled_from(["id", "embedding"]), JUNK), "id": st.one_of(st.just("alloy"), JUNK)},
        optional={"__experimental_controls": st.fixed_dictionaries({"speed": st.one_of(st.floats(-2, 2), JUNK)})},
    ),
    JUNK,
)


@fuzzing(**FUZZ, max_examples=300)
@given(
    voice=CARTESIA_VOICES,
    speed=st.one_of(st.sampled_from(["slow", "normal", "fast", "fastest"]), st.floats(0, 5), JUNK),
    config=st.one_of(st.fixed_dictionaries({"speed": st.one_of(st.floats(0, 5), JUNK)}), JUNK),
    output=st.one_of(st.just(RAW), JUNK),
)
def test_fuzzed_cartesia_voice_and_speed_forms_are_read_or_refused_by_field(
    voice: Any, speed: Any, config: Any, output: Any
) -> None:
    """Every voice and speed form Cartesia's clients send is read (a multiplier within the server's range)
    or refused with a 400 that names the field and no class of ours."""
    import adapters

    request = {
        "voice": voice,
        "speed": speed,
        "generation_config": config,
        "output_format": output,
        "transcript": "Hi.",
    }
    try:
        fields = adapters.cartesia_fields(server.parse_model(adapters.CartesiaRequest, request), websocket=True)
    except server.ApiError as exc:
        assert exc.status == 400 and exc.param and exc.param.split(".")[0] in request, (exc.param, exc.message)
        assert "Cartesia" not in exc.message and "Controls" not in exc.message, exc.message
    else:
        assert 0.25 <= fields.speed <= 4.0 and fields.voice_name


def test_cartesia_error_mid_context_ends_it_with_its_context_id(piper: ServerProcess) -> None:
    first = {"model_id": "sonic-2", "voice": "alloy", "output_format": RAW, "context_id": "c", "continue": True}
    events = cartesia_context(
        piper, {**first, "transcript": "Hello"}, {**first, "transcript": "there", "speed": "warp"}, timeout=30
    )
    assert events[-1]["type"] == "error" and events[-1]["context_id"] == "c"


def test_cartesia_sse_and_voices_answer_bad_input_in_cartesia_shape(piper: ServerProcess) -> None:
    body = {"model_id": "sonic-2", "transcript": TEXT, "voice": "alloy", "output_format": RAW}
    assert httpx.post(f"{piper.url}/tts/sse", json=body, timeout=60).status_code == 401
    headers = {"X-API-Key": KEY, "Cartesia-Version": "2025-04-16"}
    answer = httpx.post(f"{piper.url}/tts/sse", json={**body, "voice": None}, headers=headers, timeout=60)
    assert answer.status_code == 400 and answer.json()["error_code"] == "missing_field"
    wav = {"container": "wav", "encoding": "pcm_s16le", "sample_rate": RATE}
    answer = httpx.post(f"{piper.url}/tts/sse", json={**body, "output_format": wav}, headers=headers, timeout=60)
    assert answer.status_code == 400 and answer.json()["error_code"] == "unsupported_format"
    for query in ("limit=0", "limit=101", "starting_after=nobody", "is_owner=maybe"):
        answer = httpx.get(f"{piper.url}/voices?{query}", headers=headers, timeout=60)
        assert answer.status_code == 400 and answer.json()["error_code"] == "invalid_value", query
    page = httpx.get(f"{piper.url}/voices?limit=3&starting_after=alloy", headers=headers, timeout=60).json()
    assert [v["id"] for v in page["data"]] == ["ash", "ballad", "cedar"] and page["has_more"]
    back = httpx.get(f"{piper.url}/voices?limit=3&ending_before=ash", headers=headers, timeout=60).json()
    assert [v["id"] for v in back["data"]] == ["default", "alloy"] and not back["has_more"]
    assert httpx.get(f"{piper.url}/voices/alloy", headers=headers, timeout=60).json()["name"] == "Alloy"
    assert httpx.get(f"{piper.url}/voices/nobody", headers=headers, timeout=60).status_code == 404


def test_cartesia_a_complete_sentence_pushed_with_continue_is_spoken_before_the_buffer_delay(
    piper: ServerProcess,
) -> None:
    """ "Hello there. " is a whole sentence: it is spoken at once, not after max_buffer_delay_ms (5 s here)
    or the next push (split_complete alone waits for the text after a sentence end). The time to first
    audio is printed (BENCHMARKS.md has it before and after)."""
    url = piper.url.replace("http", "ws", 1) + f"/tts/websocket?api_key={KEY}"
    message = {"model_id": "sonic-2", "voice": "alloy", "output_format": RAW, "context_id": "s", "continue": True}
    with websockets.sync.client.connect(url, open_timeout=60) as ws:
        started = time.monotonic()
        ws.send(json.dumps({**message, "transcript": "Hello there. ", "max_buffer_delay_ms": 5000}))
        first = json.loads(ws.recv(timeout=120))
        waited = time.monotonic() - started
        assert first["type"] == "chunk" and waited < 5.0, (first, waited)  # before the buffer delay could end
        ws.send(json.dumps({**message, "transcript": "", "continue": False}))
        while not json.loads(ws.recv(timeout=120))["done"]:
            pass
    print(f"cartesia: first audio of a pushed 'Hello there. ' after {waited:.3f} s")


@pytest.mark.parametrize(
    "pushed,complete",
    [
        ("Hello there. ", True),
        ("Yes! ", True),
        ("Ok? \n", True),
        ("Hello there.", False),  # the sentence may go on ("there.com"): wait for the space
        ("Hello there! How ", False),  # split_complete speaks "Hello there! " by itself
        ("Hello Mr. ", False),
        ("It costs 3 dollars, e.g. ", False),
        ("Wait... ", False),
        ("   ", False),
    ],
)
def test_a_pushed_sentence_is_complete_when_it_ends_with_its_end_and_a_space(pushed: str, complete: bool) -> None:
    import adapters

    assert adapters.ends_sentence(pushed) is complete


def test_wyoming_voices_carry_names_languages_and_what_they_are(piper: ServerProcess) -> None:
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe, Info

    async def describe() -> Info:
        async with AsyncTcpClient("127.0.0.1", int(piper.env["WYOMING_PORT"])) as client:
            await client.write_event(Describe().event())
            event = await asyncio.wait_for(client.read_event(), 60)
            assert event is not None
            return Info.from_event(event)

    voices = asyncio.run(describe()).tts[0].voices
    labels = [voice.description or voice.name for voice in voices]  # what Home Assistant's dropdown shows
    assert len(set(labels)) == len(labels) == 14
    for voice, label in zip(voices, labels):
        assert label.lower().startswith(voice.name) and "English" in label and voice.languages == ["en"]
    assert "built-in" in labels[0] and "OpenAI" in labels[1]


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (openssl's command line)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_settings_go_together_and_name_missing_files(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    assert server.Settings.from_env({"TLS_CERT": str(cert), "TLS_KEY": str(key)}).tls_key == str(key)
    for env in ({"TLS_CERT": str(cert)}, {"TLS_KEY": str(key)}, {"TLS_CERT": str(cert), "TLS_KEY": "/nowhere.pem"}):
        with pytest.raises(SystemExit):
            server.Settings.from_env(env)


@dataclass
class TlsServer:
    srv: ServerProcess
    cert: Path
    url: str  # https://...
    trusted: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """A Piper server that serves TLS itself, with a certificate made here (and the API key)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = make_certificate(directory)
    (directory / "voices").mkdir()
    srv = ServerProcess(
        "piper", None, directory / "voices", command=None, TLS_CERT=str(cert), TLS_KEY=str(key), API_KEY=KEY
    )
    served = TlsServer(srv, cert, f"https://127.0.0.1:{srv.port}", ssl.create_default_context(cafile=str(cert)))
    try:
        deadline = time.monotonic() + 600
        while True:
            assert srv.proc.poll() is None, srv.logs()
            try:
                if httpx.get(f"{served.url}/ready", verify=served.trusted, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, srv.logs()
                time.sleep(0.3)
        yield served
    finally:
        srv.stop()


def test_the_server_serves_https_and_wss_itself(tls: TlsServer) -> None:
    with pytest.raises(httpx.TransportError):  # plain HTTP is not served on the TLS port
        httpx.get(f"{tls.srv.url}/ready", timeout=10)
    answer = httpx.post(
        f"{tls.url}/v1/audio/speech",
        json={"input": "Served over TLS.", "voice": "alloy", "response_format": "wav"},
        headers=auth(),
        verify=tls.trusted,
        timeout=120,
    )
    assert answer.status_code == 200 and len(read_wav(answer.content)[1]) > 0
    wss = f"wss://127.0.0.1:{tls.srv.port}/tts/websocket?api_key={KEY}"
    with websockets.sync.client.connect(wss, ssl=tls.trusted, open_timeout=60) as ws:
        message = {"model_id": "sonic-2", "voice": "alloy", "output_format": RAW, "context_id": "t"}
        ws.send(json.dumps({**message, "transcript": "Secure sockets."}))
        events: list[dict[str, Any]] = []
        while not events or not events[-1]["done"]:
            events.append(json.loads(ws.recv(timeout=120)))
    assert events[-1]["type"] == "done" and pcm_seconds(events, "t") > 0.3


def test_the_images_healthcheck_asks_over_https_when_tls_is_on(tls: TlsServer) -> None:
    """Dockerfile's HEALTHCHECK (compose.yaml's is the same: server_test.py checks) reads TLS_CERT."""
    line = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if "CMD [" in line and "/ready" in line)
    command = json.loads(line[line.index("[") :])
    env = {**os.environ, "PORT": str(tls.srv.port), "TLS_CERT": str(tls.cert)}
    assert subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode == 0
    plain = {**env, "TLS_CERT": ""}  # asked over plain HTTP, the TLS port does not answer
    assert subprocess.run([sys.executable, *command[1:]], env=plain, capture_output=True, timeout=30).returncode != 0


JS_SDKS = ["@elevenlabs/elevenlabs-js@2.73.0", "@cartesia/cartesia-js@4.2.0"]
SDK_NODE = ROOT / ".cache" / "sdk-node"


def node_modules() -> Path:
    """The JavaScript SDKs, installed by npm into .cache/sdk-node once (skips where Node or npm is missing)."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("Node and npm are needed for the JavaScript SDKs")
    stamp = SDK_NODE / ".packages"
    if not stamp.is_file() or stamp.read_text() != " ".join(JS_SDKS):
        SDK_NODE.mkdir(parents=True, exist_ok=True)
        installed = subprocess.run(
            ["npm", "install", "--prefix", str(SDK_NODE), "--no-audit", "--no-fund", "--no-save", *JS_SDKS],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if installed.returncode != 0:
            pytest.skip(f"npm could not install {JS_SDKS}: {installed.stderr[-500:]}")
        stamp.write_text(" ".join(JS_SDKS))
    return SDK_NODE / "node_modules"


def test_javascript_sdks_speak_and_list_voices_over_the_servers_own_tls(tls: TlsServer, tmp_path: Path) -> None:
    """Cartesia's JavaScript SDK connects with wss:// only, ElevenLabs' with https://: both against TLS_CERT."""
    modules = node_modules()
    done = subprocess.run(
        ["node", str(ROOT / "tools" / "sdk_check.mjs"), tls.url, KEY, str(tmp_path)],
        env={**os.environ, "NODE_PATH": str(modules), "NODE_EXTRA_CA_CERTS": str(tls.cert)},
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=end_with_parent,
    )
    assert done.returncode == 0, f"{done.stderr}\n{tls.srv.logs()[-4000:]}"
    found = json.loads(done.stdout)
    eleven, cartesia = found["elevenlabs"], found["cartesia"]
    for file in (eleven["convert"]["file"], eleven["convertWithTimestamps"]["file"], cartesia["generate"]["file"]):
        assert plausible(seconds(tmp_path / file)), file
    assert eleven["convertWithTimestamps"]["characters"] == TEXT
    assert len(eleven["voices"]["getAll"]) == 14 and eleven["voices"]["search"] == {
        "ids": eleven["voices"]["getAll"][:5],
        "hasMore": True,
        "total": 14,
    }
    assert cartesia["voices"] == eleven["voices"]["getAll"]  # every page of 5, by the SDK's cursor
    ws = cartesia["websocket"]
    assert ws["url"].startswith("wss://") and ws["types"][-1] == "done"
    assert plausible(seconds(tmp_path / ws["file"]))
