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
    ToolResult,
    ToolRun,
    end_with_parent,
    free_port,
    tool_run,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; `make gpu-check` runs them)")
    config.addinivalue_line(
        "markers", "tool_run(name): the test reads `tool_result`, that tool's run (testing.TOOL_RUNS)"
    )


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


def start_checkpoint_build(root: Path) -> tuple[dict[str, Path], subprocess.Popen[bytes], Path]:
    dirs = {kind: root / kind for kind in MODELS}
    # One process writes all three (chatterbox is imported once), beside the tests that need none.
    build = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import random_checkpoint; "
        "[random_checkpoint.write_checkpoint(Path(d), k, True, 7) for k, d in zip(sys.argv[2::2], sys.argv[3::2])]"
    )
    log = root / "build.log"
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


class HeadStart:
    """The slow things the session's later tests need, started early so that they overlap the in-process
    tests before them: the tiny checkpoints' build at once; once it is done, the test servers and the
    tools' runs (one at a time). Started between tests, from the main thread: a test server's death
    signal follows the thread that started it."""

    def __init__(self, tmp: pytest.TempPathFactory, servers: bool, tools: list[str]):
        self.tmp, self.wants_servers = tmp, servers
        self.build = start_checkpoint_build(tmp.mktemp("checkpoints"))
        self.servers: dict[str, ServerProcess] = {}
        self.tools = tools  # in the order they start
        self.tool_runs: dict[str, ToolRun] = {}

    def checkpoints(self) -> dict[str, Path]:
        dirs, proc, log = self.build
        if proc.wait() != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, log.read_bytes())
        return dirs

    def advance(self) -> None:
        """Start what can start now."""
        if self.wants_servers and "piper" not in self.servers:  # Piper needs no checkpoint
            self.start_server("piper", None)
        if self.build[1].poll() is None:
            return
        if self.wants_servers and len(self.servers) == 1:
            for kind, directory in self.checkpoints().items():
                self.start_server(kind, directory)
        waiting = [name for name in self.tools if name not in self.tool_runs]
        if waiting and all(run.proc is not None and run.proc.poll() is not None for run in self.tool_runs.values()):
            self.start_tool(waiting[0])

    def start_server(self, kind: str, model_dir: Path | None) -> None:
        # Piper and Turbo also serve the TCP protocols (Wyoming, AudioSocket) for the adapter tests.
        ports = {"WYOMING_PORT": str(free_port()), "AUDIOSOCKET_PORT": str(free_port())}
        voices = self.tmp.mktemp(f"voices-{kind}")
        # command and port are named so that mypy does not match the environment's strings to them.
        self.servers[kind] = ServerProcess(
            kind, model_dir, voices, command=None, port=None, **(ports if kind in ("piper", "turbo") else {})
        )

    def start_tool(self, name: str) -> ToolRun:
        run = self.tool_runs[name] = tool_run(name, self.checkpoints(), self.tmp.mktemp(f"tool-{name}"))
        run.start()
        return run

    def tool_result(self, name: str) -> ToolResult:
        run = self.tool_runs.get(name) or self.start_tool(name)
        return run, run.result()

    def stop(self) -> None:
        for srv in self.servers.values():
            srv.stop()
        for proc in [self.build[1], *(run.proc for run in self.tool_runs.values() if run.proc is not None)]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def head_start(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeadStart | None]:
    """What the selected tests need of the slow things (none: no head start)."""
    items = request.session.items
    needs = set().union(*(getattr(item, "fixturenames", ()) for item in items))
    tools = [marker.args[0] for item in items for marker in item.iter_markers("tool_run")]
    if not ({"checkpoints", "servers"} & needs or tools):
        yield None
        return
    start = HeadStart(tmp_path_factory, "servers" in needs, tools)
    try:
        yield start
    finally:
        start.stop()


@pytest.fixture(autouse=True)
def advance_head_start(head_start: HeadStart | None) -> None:
    if head_start is not None:
        head_start.advance()


@pytest.fixture(scope="session")
def checkpoints(head_start: HeadStart | None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return (head_start or HeadStart(tmp_path_factory, False, [])).checkpoints()


@pytest.fixture(scope="session")
def servers(head_start: HeadStart | None) -> dict[str, ServerProcess]:
    assert head_start is not None and head_start.wants_servers
    head_start.advance()  # Piper, if no test before started it: it needs no checkpoint
    head_start.checkpoints()
    head_start.advance()  # the others, now that their checkpoints exist
    for srv in head_start.servers.values():
        srv.wait_ready()
    return head_start.servers


@pytest.fixture()
def tool_result(request: pytest.FixtureRequest, head_start: HeadStart | None) -> ToolResult:
    """The finished run of the test's `tool_run` (started ahead of the test when the session could)."""
    marker = request.node.get_closest_marker("tool_run")
    assert marker is not None and head_start is not None
    return head_start.tool_result(marker.args[0])


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
