"""pytest's hooks and the shared fixtures: the `cuda` marker (its tests are skipped without a CUDA GPU), the
stand-in engine's app, the tiny random-weight checkpoints, the real server processes on them, and a loaded engine."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from starlette.testclient import TestClient

import server
from testing import (
    ENGINES,
    MODELS,
    ROOT,
    ServerProcess,
    ToneEngine,
    end_with_parent,
    free_port,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; `make gpu-check` runs them)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture()
def fake_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = server.Settings(voices_dir=str(tmp_path / "voices"), max_input_chars=200, chunk_max_chars=40)
    with TestClient(server.create_app(settings, ToneEngine())) as client:
        deadline = time.time() + 10
        while client.get("/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.01)
        yield client


CheckpointBuild = tuple[dict[str, Path], subprocess.Popen[bytes], Path]


def start_checkpoint_build(tmp_path_factory: pytest.TempPathFactory) -> CheckpointBuild:
    root = tmp_path_factory.mktemp("checkpoints")
    dirs = {kind: root / kind for kind in MODELS}

    # One process writes all three (chatterbox is imported once), beside the tests that need none.
    build = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import random_checkpoint; "
        "[random_checkpoint.write_checkpoint(Path(d), k, True, 7) for k, d in zip(sys.argv[2::2], sys.argv[3::2])]"
    )
    log = tmp_path_factory.mktemp("checkpoint-build") / "output.log"
    with open(log, "wb") as output:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                build,
                str(ROOT / "tools"),
                *[str(part) for kind in MODELS for part in (kind, dirs[kind])],
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=end_with_parent,
        )
    return dirs, proc, log


@pytest.fixture(scope="session", autouse=True)
def checkpoint_build(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CheckpointBuild | None]:
    """Starts writing the checkpoints as the session starts, when a selected test needs them: the build
    overlaps the in-process tests that come first. `checkpoints` waits for it."""
    if not any({"checkpoints", "servers"} & set(getattr(item, "fixturenames", ())) for item in request.session.items):
        yield None
        return
    build = start_checkpoint_build(tmp_path_factory)
    try:
        yield build
    finally:
        if build[1].poll() is None:
            build[1].kill()
        build[1].wait()


@pytest.fixture(scope="session")
def checkpoints(checkpoint_build: CheckpointBuild | None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs, proc, log = checkpoint_build or start_checkpoint_build(tmp_path_factory)
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, log.read_bytes())
    return dirs


@pytest.fixture(scope="session")
def servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServerProcess]]:
    # Piper needs no checkpoint: it starts while the random checkpoints are being written.
    # Piper and Turbo also serve the TCP protocols (Wyoming, AudioSocket) for the adapter tests.
    def tcp_ports() -> dict[str, str]:
        return {"WYOMING_PORT": str(free_port()), "AUDIOSOCKET_PORT": str(free_port())}

    # command=None is named so that mypy does not match the environment's strings to it.
    procs = {
        "piper": ServerProcess("piper", None, tmp_path_factory.mktemp("voices-piper"), command=None, **tcp_ports())
    }
    checkpoints = request.getfixturevalue("checkpoints")
    for kind in MODELS:
        procs[kind] = ServerProcess(
            kind,
            checkpoints[kind],
            tmp_path_factory.mktemp(f"voices-{kind}"),
            command=None,
            **(tcp_ports() if kind == "turbo" else {}),
        )
    try:
        for proc in procs.values():
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(params=ENGINES)
def live(request: pytest.FixtureRequest, servers: dict[str, ServerProcess]) -> ServerProcess:
    """Each engine's server in turn: the transport tests hold for every engine."""
    return servers[request.param]


@pytest.fixture(params=MODELS)
def chatterbox(request: pytest.FixtureRequest, servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers[request.param]


@pytest.fixture(scope="session")
def turbo_engine(checkpoints: dict[str, Path]) -> server.ChatterboxEngine:
    engine = server.ChatterboxEngine("turbo", str(checkpoints["turbo"]), "cpu")
    engine.load()
    return engine
