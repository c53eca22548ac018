"""Several replicas behind one load balancer, as README "Scaling out" sets them up on VMs or bare metal: three
real server processes sharing one VOICES_DIR behind Debian's HAProxy running deploy/haproxy/haproxy.cfg as
shipped. Piper replicas where the model does not matter (load spread, a full replica, the load gauges, a
rolling restart, a killed replica); tiny random Turbo replicas where voices must clone (a voice uploaded,
replaced and deleted through the balancer, two replicas replacing one name at once)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile
from httpx_sse import connect_sse
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

import server
from testing import ROOT, ServerProcess, end_with_parent, free_port, status_of

HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
REPLICAS = ("replica_1", "replica_2", "replica_3")
GRACE_S = 30  # every replica's SHUTDOWN_GRACE_S: far more than its streams need
FULL_QUEUE = 2  # replica_1's MAX_QUEUE in the Piper cluster: easily filled
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "How vexingly quick daft zebras jump!",
    "Sphinx of black quartz, judge my vow.",
]


def wait_until(check: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting: {what or check}"
        time.sleep(0.02)


class Cluster:
    """Three replicas of one engine on one voices directory, and HAProxy in front (stats on its own port)."""

    def __init__(self, directory: Path, kind: str, model_dir: Path | None, envs: list[dict[str, str]]):
        haproxy = shutil.which("haproxy")
        assert haproxy, "HAProxy is needed (make install apt-gets it)"
        self.kind, self.model_dir, self.envs = kind, model_dir, envs
        self.voices = directory / "voices"
        self.voices.mkdir()
        self.replicas = [self.start(env) for env in envs]
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(directory / "haproxy.log", "w+")  # noqa: SIM115 (closed in stop)
        addresses = {f"TTS_REPLICA_{n}": f"127.0.0.1:{r.port}" for n, r in enumerate(self.replicas, 1)}
        self.haproxy = subprocess.Popen(
            [haproxy, "-db", "-f", str(HAPROXY_CFG)],
            env={
                **os.environ,
                **addresses,
                "TTS_BIND": f"127.0.0.1:{self.port}",
                "TTS_STATS_BIND": f"127.0.0.1:{self.stats_port}",
                "TTS_INSTANCE": f"tts-test-{self.port}",  # its internal sockets' names: one per instance
            },
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=end_with_parent,
        )
        for replica in self.replicas:
            replica.wait_ready()
        self.wait_states(dict.fromkeys(REPLICAS, "UP"))

    def start(self, env: dict[str, str], port: int | None = None) -> ServerProcess:
        # INPUT_TIMEOUT long enough for `held` utterances to outlast any test's checks on a slow machine.
        env = {"INPUT_TIMEOUT": "300", **env}
        return ServerProcess(self.kind, self.model_dir, self.voices, command=None, port=port, **env)

    def replace(self, index: int) -> ServerProcess:
        """Start replica `index`'s successor on its address (as a rolling update does; the old one has closed
        its listener at SIGTERM and may still be draining): the balancer uses it once it is ready."""
        old = self.replicas[index]
        self.replicas[index] = self.start(self.envs[index], port=old.port)
        return old

    def states(self) -> dict[str, str]:
        """The balancer's view of each replica: UP, DOWN (and their transitions)."""
        rows = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=10).text.splitlines()
        header = rows[0].lstrip("# ").split(",")
        states = {}
        for row in rows[1:]:
            record = dict(zip(header, row.split(",")))
            if record.get("pxname") == "replicas" and record.get("svname") in REPLICAS:
                states[record["svname"]] = record["status"]
        return states

    def wait_states(self, wanted: dict[str, str], timeout: float = 60) -> None:
        def reached() -> bool:
            states = self.states()
            return all(states.get(name) == state for name, state in wanted.items())

        wait_until(reached, timeout, f"balancer states {wanted} (now {self.states()})")

    def stop(self) -> None:
        self.haproxy.terminate()
        self.haproxy.wait(10)
        self.log.close()
        for replica in self.replicas:
            replica.stop()


@pytest.fixture(scope="class")
def piper_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    common = {"SHUTDOWN_GRACE_S": str(GRACE_S)}
    envs = [{**common, "MAX_QUEUE": str(FULL_QUEUE)}, common, common]
    cluster = Cluster(tmp_path_factory.mktemp("piper-cluster"), "piper", None, envs)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="class")
def turbo_cluster(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Iterator[Cluster]:
    envs = [{"TORCH_THREADS": "1"}] * 3
    cluster = Cluster(tmp_path_factory.mktemp("turbo-cluster"), "turbo", checkpoints["turbo"], envs)
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Outcome:
    """One streamed request through the balancer, as its client saw it."""

    status: int | None = None
    served_by: str | None = None  # the replica that answered (the balancer's x-served-by)
    audio: int = 0  # bytes of PCM received
    done: bool = False  # the stream ended with speech.audio.done
    error: str | None = None  # an error event, an error status, or the connection cut


def sse_speech(url: str, text: str, started: threading.Semaphore | None = None) -> Outcome:
    """A streamed request (SSE, PCM): its status, its replica, and whether it ended as a stream should."""
    outcome = Outcome()
    body = {"input": text, "response_format": "pcm"}
    try:
        with httpx.Client(timeout=120) as client:
            with connect_sse(client, "POST", f"{url}/v1/audio/speech/stream", json=body) as source:
                outcome.status = source.response.status_code
                outcome.served_by = source.response.headers.get("x-served-by")
                if started is not None:
                    started.release()
                    started = None
                if outcome.status != 200:
                    outcome.error = source.response.read().decode()
                    return outcome
                for sse in source.iter_sse():
                    event = json.loads(sse.data)
                    if event["type"] == "speech.audio.delta":
                        outcome.audio += len(base64.b64decode(event["audio"]))
                    elif event["type"] == "speech.audio.done":
                        outcome.done = True
                    else:
                        outcome.error = sse.data
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        if started is not None:
            started.release()
    return outcome


def succeeded(outcome: Outcome) -> bool:
    return outcome.status == 200 and outcome.done and outcome.error is None and outcome.audio > 0


def metric(srv: ServerProcess, line_start: str) -> float:
    """A sample of the replica's /metrics (the first line that starts so), 0 when absent."""
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return values[0] if values else 0.0


def refused_busy(srv: ServerProcess) -> float:
    return metric(srv, 'tts_requests_total{endpoint="/v1/audio/speech",status="429"}')


def load(srv: ServerProcess) -> tuple[float, float, float]:
    """The autoscaling gauges: (tts_slots, tts_slots_busy_fraction, tts_requests_waiting)."""
    return (
        metric(srv, "tts_slots "),
        metric(srv, "tts_slots_busy_fraction "),
        metric(srv, "tts_requests_waiting "),
    )


@contextmanager
def held(url: str, count: int) -> Iterator[list[ClientConnection]]:
    """`count` utterances kept open (final: false), one per WebSocket (a connection's utterances take turns):
    each takes its place in the replica's admission with its first sentence, speaks it and then holds the
    place, waiting for more text (for the replicas' INPUT_TIMEOUT), until its connection closes."""
    with ExitStack() as stack:
        sockets = []
        for n in range(count):
            ws = stack.enter_context(connect(url.replace("http://", "ws://") + "/v1/audio/speech/ws", max_size=None))
            ws.send(json.dumps({"type": "speak", "id": f"hold-{n}", "text": "Hold on. And", "final": False}))
            sockets.append(ws)
        yield sockets


def wait_active(srv: ServerProcess, count: int) -> None:
    wait_until(lambda: status_of(srv)["queue"]["active"] == count, what=f"{count} active on {srv.url}")


class TestPiperReplicas:
    """Where the model does not matter: Piper replicas."""

    def test_load_spreads_over_every_replica(self, piper_cluster: Cluster) -> None:
        """Least connections: nine concurrent streams through the balancer land on all three replicas, and each
        is spoken whole."""
        with ThreadPoolExecutor(9) as pool:
            outcomes = list(pool.map(lambda n: sse_speech(piper_cluster.url, SENTENCES[n % 4]), range(9)))
        assert all(succeeded(o) for o in outcomes), outcomes
        counts = Counter(o.served_by for o in outcomes)
        print(f"spread: {len(outcomes)} streams, per replica {dict(sorted(counts.items(), key=str))}")
        assert set(counts) == set(REPLICAS), counts

    def test_a_websocket_passes_the_balancer_and_streams_before_its_utterance_ends(
        self, piper_cluster: Cluster
    ) -> None:
        """The upgrade passes through, and audio comes through as it is made: the utterance is still open (no end
        sent) when its first sentence's audio arrives."""
        with connect(piper_cluster.url.replace("http://", "ws://") + "/v1/audio/speech/ws") as ws:
            assert ws.response is not None and ws.response.headers["x-served-by"] in REPLICAS
            ws.send(json.dumps({"type": "speak", "id": "u", "text": SENTENCES[0] + " And", "final": False}))
            first = ws.recv(timeout=60)
            while not isinstance(first, bytes):
                assert json.loads(first)["type"] != "error", first
                first = ws.recv(timeout=60)
            assert len(first) > 0
            ws.send(json.dumps({"type": "end", "id": "u"}))
            while not (isinstance(message := ws.recv(timeout=60), str) and json.loads(message)["type"] == "done"):
                pass

    def test_a_full_replicas_429_is_retried_elsewhere_and_only_all_full_reaches_the_client(
        self, piper_cluster: Cluster
    ) -> None:
        full, others = piper_cluster.replicas[0], piper_cluster.replicas[1:]
        with held(full.url, FULL_QUEUE):
            wait_active(full, FULL_QUEUE)
            direct = httpx.post(f"{full.url}/v1/audio/speech", json={"input": "Hi."}, timeout=60)
            assert direct.status_code == 429
            before = refused_busy(full)

            def through(n: int) -> httpx.Response:
                return httpx.post(f"{piper_cluster.url}/v1/audio/speech", json={"input": SENTENCES[n % 4]}, timeout=120)

            with ThreadPoolExecutor(9) as pool:
                responses = list(pool.map(through, range(9)))
            assert [r.status_code for r in responses] == [200] * 9, [r.text for r in responses]
            assert {r.headers["x-served-by"] for r in responses} <= {"replica_2", "replica_3"}
            tried = refused_busy(full) - before
            print(f"full replica: 9 requests, 0 failed, {tried:g} 429s from the full replica retried elsewhere")
            assert tried >= 1  # the balancer did send some to the full replica, and the client never saw its 429
            # With every replica full, the client gets the replica's own 429 (and Retry-After), not a 503.
            max_queue = server.Settings().max_queue
            with held(others[0].url, max_queue), held(others[1].url, max_queue):
                for srv in others:
                    wait_active(srv, max_queue)
                refused = httpx.post(f"{piper_cluster.url}/v1/audio/speech", json={"input": "Hi."}, timeout=60)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_busy" and "x-tts-full" not in refused.headers

    def test_the_load_gauges_follow_the_utterances_in_progress(self, piper_cluster: Cluster) -> None:
        """What an autoscaler reads: 0 when idle, a replica's occupancy and then its queue as utterances are held,
        steady through one long stream (no sawtooth between its chunks), 0 again after."""
        srv = piper_cluster.replicas[1]
        wait_active(srv, 0)
        assert load(srv) == (1, 0, 0)  # Piper: one piece at a time
        for count, expected in ((1, (1, 1, 0)), (3, (1, 1, 2))):
            with held(srv.url, count):
                wait_active(srv, count)
                assert load(srv) == expected
            wait_active(srv, 0)
            assert load(srv) == (1, 0, 0)
        samples: list[tuple[float, float, float]] = []
        text = " ".join(SENTENCES * 2)  # several chunks of CHUNK_MAX_CHARS
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", f"{srv.url}/v1/audio/speech/stream/pcm", json={"input": text}) as response:
                assert response.status_code == 200
                for piece in response.iter_bytes():
                    if piece:
                        samples.append(load(srv))
        # Busy from the first audio on, through every chunk; free once the server has sent its last bytes (the
        # client may still be reading them): it never drops and comes back.
        busy = [fraction for _, fraction, _ in samples]
        assert busy[0] == 1 and busy == sorted(busy, reverse=True) and busy.count(1) >= 3, samples
        assert {waiting for *_, waiting in samples} == {0}
        wait_active(srv, 0)
        assert load(srv) == (1, 0, 0)

    def test_a_rolling_restart_fails_no_request(self, piper_cluster: Cluster) -> None:
        """SIGTERM one replica while 20 streams run: /ready turns 503 at once, the balancer takes it out, its
        streams finish within the grace, every request succeeds; its successor comes up on its address meanwhile
        and takes traffic."""
        victim = piper_cluster.replicas[1]
        with httpx.Client(base_url=victim.url, timeout=30) as kept_alive, ThreadPoolExecutor(24) as pool:
            assert kept_alive.get("/ready").status_code == 200  # this connection stays open through the drain
            streams = [pool.submit(sse_speech, piper_cluster.url, " ".join(SENTENCES[n % 4 :][:2])) for n in range(20)]
            wait_until(lambda: status_of(victim)["queue"]["active"] >= 2, what="streams on the victim")
            victim.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: kept_alive.get("/ready").status_code == 503, timeout=5, what="/ready 503")
            assert kept_alive.get("/ready").json() == {"status": "shutting_down"}
            piper_cluster.wait_states({"replica_2": "DOWN"}, timeout=15)
            piper_cluster.replace(1)
            later = [pool.submit(sse_speech, piper_cluster.url, SENTENCES[n]) for n in range(4)]
            outcomes = [future.result() for future in streams + later]
            assert victim.proc.wait(GRACE_S + 10) == -signal.SIGTERM  # uvicorn re-raises the signal it drained on
        logs = victim.logs()
        victim.stop()
        assert "shutting down: " in logs and "Traceback" not in logs and "| ERROR" not in logs, logs
        failed = [o for o in outcomes if not succeeded(o)]
        counts = Counter(o.served_by for o in outcomes[:20])
        print(
            f"rolling restart: {len(outcomes)} streams, {len(failed)} failed, per replica {dict(sorted(counts.items(), key=str))}"
        )
        assert not failed, failed
        assert counts["replica_2"] >= 2  # streams the victim had in flight finished, whole
        assert all(o.served_by != "replica_2" for o in outcomes[20:])
        piper_cluster.replicas[1].wait_ready()
        piper_cluster.wait_states({"replica_2": "UP"})
        with ThreadPoolExecutor(3) as pool:
            again = list(pool.map(lambda n: sse_speech(piper_cluster.url, " ".join(SENTENCES[:2])), range(3)))
        assert all(succeeded(o) for o in again) and "replica_2" in {o.served_by for o in again}, again

    def test_a_killed_replica_fails_only_its_own_streams(self, piper_cluster: Cluster) -> None:
        """SIGKILL one replica mid-stream: only what it was streaming fails, and fails cleanly (the connection is
        cut, never a hang); what other replicas stream goes on, and every new request succeeds elsewhere."""
        victim = piper_cluster.replicas[2]
        # One WebSocket per replica (least connections spreads open connections), each speaking an utterance
        # that stays open: what the victim streams is certainly in flight when it dies.
        with ExitStack() as stack:
            url = piper_cluster.url.replace("http://", "ws://") + "/v1/audio/speech/ws"
            sockets = [stack.enter_context(connect(url)) for _ in REPLICAS]
            placed = {ws.response.headers["x-served-by"]: ws for ws in sockets if ws.response is not None}
            assert set(placed) == set(REPLICAS)
            for ws in sockets:
                ws.send(json.dumps({"type": "speak", "id": "u", "text": SENTENCES[1] + " And", "final": False}))
                while not isinstance(ws.recv(timeout=60), bytes):
                    pass
            started = threading.Semaphore(0)
            with ThreadPoolExecutor(6) as pool:
                streams = [
                    pool.submit(sse_speech, piper_cluster.url, " ".join(SENTENCES[:3]), started) for _ in range(6)
                ]
                for _ in streams:
                    assert started.acquire(timeout=120)
                victim.proc.kill()
                with pytest.raises(ConnectionClosed):
                    while True:
                        placed["replica_3"].recv(timeout=30)
                new = list(pool.map(lambda n: sse_speech(piper_cluster.url, SENTENCES[n % 4]), range(6)))
                outcomes = [future.result() for future in streams]
            for name in ("replica_1", "replica_2"):
                placed[name].send(json.dumps({"type": "end", "id": "u"}))
                while not (isinstance(m := placed[name].recv(timeout=60), str) and json.loads(m)["type"] == "done"):
                    pass
        failed = [o for o in outcomes if not succeeded(o)]
        print(
            f"killed replica: {len(outcomes)} streams in flight ({sum(o.served_by == 'replica_3' for o in outcomes)} on "
            f"it), {len(failed)} cut; {len(new)} new requests, {sum(not succeeded(o) for o in new)} failed"
        )
        assert all(o.served_by == "replica_3" and o.error and "RemoteProtocolError" in o.error for o in failed), failed
        assert all(succeeded(o) for o in new) and all(o.served_by != "replica_3" for o in new), new
        piper_cluster.wait_states({"replica_3": "DOWN"}, timeout=15)


def reference_wav(seed: int) -> bytes:
    clip = np.random.default_rng(seed).standard_normal(24000 * 6).astype(np.float32) * 0.1
    return server.wav_header(24000, len(clip)) + server.float_to_pcm16(clip)


def flac_of(wav: bytes) -> bytes:
    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    out = io.BytesIO()
    soundfile.write(out, audio, rate, format="FLAC")
    return out.getvalue()


def upload(url: str, name: str, data: bytes, filename: str) -> httpx.Response:
    files = {"file": (filename, data, "application/octet-stream")}
    return httpx.post(f"{url}/v1/audio/voices", data={"name": name}, files=files, timeout=120)


def speak_with(srv: ServerProcess, voice: str) -> httpx.Response:
    body = {"input": "Hello there.", "voice": voice, "seed": 3, "response_format": "wav"}
    return httpx.post(f"{srv.url}/v1/audio/speech", json=body, timeout=120)


def on_every_replica(cluster: Cluster, voice: str) -> list[httpx.Response]:
    """The same seeded request on every replica at once, each directly."""
    with ThreadPoolExecutor(len(cluster.replicas)) as pool:
        return list(pool.map(lambda srv: speak_with(srv, voice), cluster.replicas))


def voice_misses(srv: ServerProcess) -> float:
    return metric(srv, "tts_voice_cache_misses_total ")


class TestTurboReplicas:
    """Where voices must clone: tiny random Turbo replicas."""

    def test_a_voice_uploaded_through_the_balancer_is_every_replicas_at_once(self, turbo_cluster: Cluster) -> None:
        """Uploaded through the balancer: the next request on every replica speaks it (each prepares the same
        clip: the same seeded bytes); replaced: every replica speaks the new clip; deleted: gone everywhere."""
        replicas = turbo_cluster.replicas
        assert upload(turbo_cluster.url, "shared", reference_wav(1), "shared.wav").status_code == 201
        misses = [voice_misses(srv) for srv in replicas]
        first = on_every_replica(turbo_cluster, "shared")
        assert [r.status_code for r in first] == [200] * 3
        assert len({r.content for r in first}) == 1  # one clip, one seed: the same audio on every replica
        assert [voice_misses(srv) for srv in replicas] == [m + 1 for m in misses]
        for srv in replicas:
            assert "shared" in {v["id"] for v in httpx.get(f"{srv.url}/v1/audio/voices", timeout=30).json()["data"]}

        assert upload(turbo_cluster.url, "shared", flac_of(reference_wav(2)), "shared.flac").status_code == 201
        assert sorted(p.name for p in turbo_cluster.voices.glob("shared*")) == ["shared.flac"]
        second = on_every_replica(turbo_cluster, "shared")
        assert [r.status_code for r in second] == [200] * 3
        assert len({r.content for r in second}) == 1 and second[0].content != first[0].content
        assert [voice_misses(srv) for srv in replicas] == [m + 2 for m in misses]  # prepared anew: new content

        assert httpx.delete(f"{turbo_cluster.url}/v1/audio/voices/shared", timeout=30).status_code == 200
        for response in on_every_replica(turbo_cluster, "shared"):
            assert response.status_code == 400 and response.json()["error"]["param"] == "voice"
        for srv in replicas:
            assert "shared" not in {v["id"] for v in httpx.get(f"{srv.url}/v1/audio/voices", timeout=30).json()["data"]}

    def test_the_load_gauges_count_a_batchs_slots(self, turbo_cluster: Cluster) -> None:
        """Chatterbox: the slots are the T3 batch's (MAX_BATCH: 8 on CPU), the queue starts beyond them."""
        srv = turbo_cluster.replicas[0]
        assert load(srv) == (8, 0, 0)
        with held(srv.url, 3):
            wait_active(srv, 3)
            assert load(srv) == (8, 3 / 8, 0)
        wait_active(srv, 0)
        assert load(srv) == (8, 0, 0)

    def test_two_replicas_replacing_one_name_at_once_leave_one_intact_file(self, turbo_cluster: Cluster) -> None:
        """Two replicas save one name in two formats at the same moment, again and again: each time exactly one
        file is left, whole (one of the two uploads, byte for byte), no temporary file, and it speaks."""
        wav, flac = reference_wav(3), flac_of(reference_wav(4))
        first, second = turbo_cluster.replicas[:2]
        for _ in range(3):
            with ThreadPoolExecutor(2) as pool:
                saves = [
                    pool.submit(upload, first.url, "race", wav, "race.wav"),
                    pool.submit(upload, second.url, "race", flac, "race.flac"),
                ]
                assert [save.result().status_code for save in saves] == [201, 201]
            files = [p for p in turbo_cluster.voices.iterdir() if "race" in p.name]
            assert len(files) == 1, files
            [kept] = files
            assert kept.read_bytes() == {"race.wav": wav, "race.flac": flac}[kept.name]
        assert [r.status_code for r in on_every_replica(turbo_cluster, "race")] == [200] * 3


def test_a_voice_save_waits_for_another_replicas_save_of_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministically, the interleaving the test above can only hope for: replica A has put its file in place
    and is about to remove the name's other files when replica B saves the name in another format. B's save
    waits for A's to end (the lock in VOICES_DIR), so B's file is the one left; without the lock, A would then
    remove B's file, and B had removed A's: no file at all."""
    a, b = (server.VoiceLibrary(tmp_path, server.VOICE_EXTENSIONS) for _ in "ab")  # two processes' libraries
    replace = os.replace
    b_saving: list[threading.Thread] = []

    def replace_then_let_b_in(source: Any, target: Any) -> None:
        replace(source, target)
        if not b_saving:
            b_saving.append(threading.Thread(target=b.save, args=("race", b"from b", ".flac")))
            b_saving[0].start()
            b_saving[0].join(timeout=0.5)  # B runs now, unless it has to wait for A

    monkeypatch.setattr(os, "replace", replace_then_let_b_in)
    a.save("race", b"from a", ".wav")
    b_saving[0].join(timeout=30)
    assert not b_saving[0].is_alive()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["race.flac"]
    assert (tmp_path / "race.flac").read_bytes() == b"from b"
