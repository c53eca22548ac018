"""The golden bytes: every seeded transport and protocol on every engine reproduces golden/outputs.json
(`make golden` records it)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
import torch

from testing import (
    ROOT,
    ServerProcess,
    TwilioCall,
    WsClient,
    audiosocket_call,
    speak,
    sse_events,
    stream_pcm,
)

# ---------------------------------------------------------------------------
# Golden bytes: every seeded transport's output, pinned before the code is reshaped
# ---------------------------------------------------------------------------

GOLDEN = ROOT / "golden" / "outputs.json"
GOLDEN_TEXT = "Golden bytes. Exactly."


def machine_fingerprint() -> str:
    """What seeded bytes depend on besides the code: the CPU (its kernels' arithmetic), how many cores the
    model's threads get, torch and onnxruntime."""
    import onnxruntime

    names = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    return (
        f"{names[0] if names else 'cpu'}; {torch.backends.cpu.get_cpu_capability()}; {os.cpu_count()} cores; "
        f"torch {torch.__version__}; onnxruntime {onnxruntime.__version__}"
    )


def golden_cases(srv: ServerProcess) -> dict[str, bytes]:
    """What a client of each seeded transport receives for GOLDEN_TEXT: the audio bytes, and the timings of
    those that send them (protocols with no seed, Cartesia's, ElevenLabs' WebSockets and Wyoming, cannot
    reproduce their bytes and are left out)."""
    import uuid

    text, seed = GOLDEN_TEXT, 17
    cases = {
        "openai file": speak(srv, input=text, seed=seed).content,
        "openai stream": speak(srv, input=text, seed=seed, response_format="pcm", stream_format="audio").content,
        "openai mp3": speak(srv, input=text, seed=seed, response_format="mp3", sample_rate=16000).content,
        "raw pcm": stream_pcm(srv, input=text, seed=seed, sample_rate=16000),
    }
    events = sse_events(srv, "/v1/audio/speech/stream", {"input": text, "seed": seed, "response_format": "pcm"})
    cases["sse"] = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    cases["sse"] += json.dumps(events[-1]["usage"], sort_keys=True).encode()
    ws = WsClient(srv)
    ws.send(type="speak", id="g", text=text, seed=seed, response_format="wav", sample_rate=8000)
    audio, messages = ws.until_done("g")
    ws.close()
    cases["websocket"] = audio + json.dumps(messages[0], sort_keys=True).encode()
    call = TwilioCall(srv, "?" + urlencode({"text": text, "seed": seed}))
    cases["twilio"] = b"".join(call.until_marks(2).values())
    call.send(event="stop")
    call.close_code()
    base = f"{srv.url}/v1/text-to-speech/default"
    cases["elevenlabs"] = httpx.post(
        f"{base}?output_format=pcm_22050", json={"text": text, "seed": seed}, timeout=120
    ).content
    lines = httpx.post(f"{base}/stream/with-timestamps", json={"text": text, "seed": seed}, timeout=120)
    # Its audio only: the timings beside it are measured, and changed by design when they became real.
    cases["elevenlabs timestamps audio"] = b"".join(
        base64.b64decode(json.loads(line)["audio_base64"]) for line in lines.text.splitlines()
    )
    from websockets.sync.client import connect
    from websockets.typing import Subprotocol

    with connect(
        f"ws://127.0.0.1:{srv.port}/v1/telephony/asterisk?{urlencode({'text': text, 'seed': seed})}",
        subprotocols=[Subprotocol("media")],
    ) as asterisk:
        asterisk.send("MEDIA_START connection_id:g channel:WebSocket/g format:ulaw optimal_frame_size:160")
        media = b""
        while (message := asterisk.recv(timeout=120)) != "HANGUP":
            if isinstance(message, bytes):
                media += message
            elif message.startswith("STOP_MEDIA_BUFFERING "):
                asterisk.send("MEDIA_BUFFERING_COMPLETED " + message.split()[1])
    cases["asterisk websocket"] = media
    if "AUDIOSOCKET_PORT" in srv.env:
        call_id = uuid.uuid4()
        httpx.post(f"{srv.url}/v1/telephony/audiosocket/{call_id}", json={"text": text, "seed": seed}, timeout=60)
        frames, _ = asyncio.run(audiosocket_call(int(srv.env["AUDIOSOCKET_PORT"]), b"\x01\x00\x10" + call_id.bytes))
        cases["audiosocket"] = b"".join(payload for kind, payload, _ in frames if kind == 0x10)
    return cases


def test_every_seeded_transport_reproduces_its_golden_bytes(servers: dict[str, ServerProcess]) -> None:
    """Every seeded transport and protocol on every engine gives the bytes recorded in golden/outputs.json
    (SHA-256 and length) for this kind of machine. Reshaping the code must not change one byte. The
    record is only ever written by `make golden [GOLDEN_AT=REV]`, which serves REV's code; a machine
    with no record yet skips, saying how to make one from the commit the others were recorded at."""
    record = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"machines": {}}
    machine = machine_fingerprint()
    recording = os.environ.get("GOLDEN_RECORD") == "1"
    if not recording and machine not in record["machines"]:
        pytest.skip(
            f"no golden bytes for this machine ({machine}): record them with "
            f"`make golden GOLDEN_AT={record.get('commit', 'REV')}`"
        )
    with ThreadPoolExecutor(len(servers)) as pool:  # the engines' servers work side by side
        outputs = dict(zip(servers, pool.map(golden_cases, servers.values())))
    got = {
        f"{engine} {case}": f"{hashlib.sha256(data).hexdigest()} {len(data)}"
        for engine, cases in outputs.items()
        for case, data in cases.items()
    }
    assert all(data for cases in outputs.values() for data in cases.values())
    if recording:
        commit = (
            os.environ.get("GOLDEN_COMMIT")
            or subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
            ).stdout.strip()
        )
        if record.get("commit") not in (None, commit):
            record["machines"] = {}  # another baseline: the other machines' records must be made from it too
        record["commit"] = commit
        record["machines"][machine] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        return
    expected = record["machines"][machine]
    assert sorted(got) == sorted(expected)
    changed = [case for case in expected if got[case] != expected[case]]
    assert not changed, f"bytes changed since {record['commit']}: {changed}"
