"""Tests of the benchmarks and tools: bench.py and tools/gpu_check.py (its CPU dry run), on tiny checkpoints;
tools/loadtest.py's soak with hostile clients against a real server; the Piper tools."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from testing import (
    MODELS,
    ROOT,
    ServerProcess,
    ToolResult,
    free_port,
    load_tool,
)


@pytest.mark.tool_run("gpu_check")
def test_gpu_check_dry_run_writes_its_table(tool_result: ToolResult) -> None:
    """make gpu-check's script, on the CPU with tiny checkpoints, so that a GPU is not its first run. Every
    model's steps pass the sync check: the reads the token loop makes on purpose (the block's tokens,
    Multilingual's monitor every step) are let through by name, any other read fails it."""
    run, result = tool_result
    out = run.directory / "report.md"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("### `make gpu-check`") and any(line.startswith("- Commit: ") for line in lines)
    rows = {
        tuple(cell.strip() for cell in line.strip("|").split("|")[:3]): line.split("|")[4:7]
        for line in lines
        if line.startswith("| ") and not line.startswith(("| check |", "| --- |"))
    }
    for kind in MODELS:
        assert rows[("checkpoint", kind, "")][0].strip() == "ok"
        assert rows[("warm-up", kind, "defaults")][0].strip() == "ok"
        verdict, figure, details = (cell.strip() for cell in rows[("sync: decode steps", kind, "defaults")])
        assert verdict == "ok" and figure == "0 other host reads in 7 steps"
        assert "block tokens x7" in details and ("alignment monitor x7" in details) == (kind == "multilingual")
        assert rows[("sync: token loop", kind, "defaults")][0].strip() == "info"
        assert re.fullmatch(r"\d+ per step", rows[("kernels", kind, "defaults")][0].strip())
        assert float(rows[("speed: T3 steps/s", kind, "defaults")][0]) > 0


def bench_output(tool_result: ToolResult) -> tuple[str, list[str]]:
    """bench.py's run on tiny Turbo, as a user runs it: its output and that output's lines."""
    _, result = tool_result
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stdout.strip().splitlines()


def named_rows(lines: list[str], starts: tuple[str, ...], name_at: int) -> dict[str, dict[str, str]]:
    """The output lines that start so, by the word at `name_at`, each with the name=value pairs after it."""
    return {
        line.split()[name_at]: dict(item.split("=") for item in line.split()[name_at + 1 :])
        for line in lines
        if line.startswith(starts)
    }


@pytest.mark.tool_run("bench")
def test_bench_runs_stock_and_ours_and_ends_with_the_speedup(tool_result: ToolResult) -> None:
    stdout, lines = bench_output(tool_result)
    rows = named_rows(lines, ("stock ", "ours "), 0)
    for row in rows.values():
        assert float(row["tokens"]) == 12 and float(row["t3_tokens_per_s"]) > 0 and float(row["e2e_rtf"]) > 0
    assert re.fullmatch(r"speedup_e2e=\d+\.\d{3}", lines[-1])
    row = load_tool("gpu_check").bench_row(stdout, "defaults", "cpu")  # make gpu-check's reading of it
    assert row.result == lines[-1].replace("=", " ") and "T3 tokens/s" in row.details


@pytest.mark.tool_run("bench_concurrency")
def test_bench_concurrency_batches_streams_against_one_slot_at_a_time(tool_result: ToolResult) -> None:
    stdout, lines = bench_output(tool_result)
    rows = {
        name: row
        for name, row in named_rows(lines, ("concurrency 2 ",), 2).items()
        if name in ("batched", "one_at_a_time")
    }
    assert set(rows["batched"]) >= {"audio_s_per_s", "t3_tokens_per_s", "s3gen_ms_per_token", "first_audio_p95_s"}
    assert all(float(row["audio_s_per_s"]) > 0 for row in rows.values()) and len(rows) == 2
    assert re.fullmatch(r"speedup_batched=\d+\.\d{3}", lines[-1])
    assert [row.check for row in load_tool("gpu_check").concurrency_rows(stdout)] == [
        "bench.py --concurrency 2",
        "bench.py --concurrency",
    ]


@pytest.mark.tool_run("bench_s3gen")
def test_bench_s3gen_prices_a_streamed_token_against_a_whole_file_one(tool_result: ToolResult) -> None:
    _, lines = bench_output(tool_result)
    rows = named_rows(lines, ("s3gen ",), 1)
    assert set(rows) == {"whole", "before", "10,20:8"}
    assert all(float(row["ms_per_token"]) > 0 for row in rows.values())
    assert float(rows["whole"]["vs_whole"]) == 1 and float(rows["10,20:8"]["mel_error_db"]) < 0
    assert re.fullmatch(r"s3gen_streamed_vs_whole=\d+\.\d{3}", lines[-1])


def test_soak_with_hostile_clients_reports_each_cut_and_no_failure(tmp_path: Path) -> None:
    """loadtest.py --soak --hostile as a user runs it, against a Piper server with short timeouts: every
    hostile kind is cut by the server (none reaches the bound), normal traffic is heard in both phases, and
    the server's memory and descriptors are sampled."""
    wyoming = free_port()
    srv = ServerProcess(
        "piper",
        None,
        tmp_path / "voices",
        HEADER_TIMEOUT="2",
        INPUT_TIMEOUT="2",
        STREAM_SEND_TIMEOUT="2",
        WYOMING_PORT=str(wyoming),
    )
    try:
        srv.wait_ready()
        soak = ["--concurrency", "1", "--soak", "16", "--hostile", "3", "--phase", "4", "--hostile-bound", "40"]
        soak += ["--wyoming-port", str(wyoming), "--rss-every", "2", "--seed", "3", "--json"]
        result = subprocess.run(
            [sys.executable, "tools/loadtest.py", "--url", srv.url, *soak],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        summary = json.loads(result.stdout)
        assert result.returncode == 0 and summary["server_failures"] == 0, summary["failures"]
        held = summary["hostile"]["held_s"]
        kinds = {"idle", "slowloris", "xoff", "silent_contexts", "silent_utterance", "silent_twilio", "wyoming_idle"}
        assert set(held) == kinds and all(row["max"] < 40 for row in held.values()), held
        assert not any(end.startswith("client ") for end in summary["hostile"]["ends"]), summary["hostile"]["ends"]
        assert summary["first_audio"]["calm"]["n"] > 0 and summary["first_audio"]["hostile"]["n"] > 0
        assert all(sample[3] is not None and sample[3] > 0 for sample in summary["rss_samples"])
        assert "Traceback" not in srv.logs()
    finally:
        srv.stop()


def test_piper_peers_dry_run_names_the_pinned_peers_and_the_same_voice() -> None:
    """Its dry run installs and starts nothing: the commands it would run, each peer pinned, one voice for all."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "piper_peers.py"), "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    serve = [line for line in done.stdout.splitlines() if line.startswith("serve:")]
    assert len(serve) == 3 and "server.py" in serve[0]
    assert "piper.http_server" in serve[1] and "wyoming-piper" in serve[2]
    assert all("en_US-joe-medium" in line for line in serve[1:])
    for line in done.stdout.splitlines():
        if line.startswith("install:") and " install " in line:
            assert all("==" in word for word in line.split(" install -q ")[1].split())
    assert "over HTTP" in done.stdout and "over Wyoming" in done.stdout


def test_piper_peers_counts_a_stall_as_a_listener_would_hear_it() -> None:
    """A listener plays from the first audio byte on: a part arriving after what came before has played out is a
    stall of that difference; parts ahead of the listener are none."""
    peers = load_tool("piper_peers")
    assert peers.stall_of([(10.0, 0), (11.5, 100)], 100) == pytest.approx(0.5)  # 1 s of audio, more at 1.5 s
    assert peers.stall_of([(10.0, 0), (10.5, 100), (11.2, 200), (11.9, 200)], 100) == 0.0
    assert peers.stall_of([], 100) == 0.0


def test_piper_batch_compares_batched_runs_with_one_run_each() -> None:
    """On the bundled voice: every size's row, both rates counted from each sentence's own samples (padding
    left out), and their ratio."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "piper_batch.py"), "--reps", "1", "--sizes", "2,3"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if re.match(r"\| \d", line)]
    assert [row[0].strip() for row in rows] == ["2", "3"]
    for row in rows:
        each, batched = (float(cell.split()[0]) for cell in row[1:3])
        assert each > 1 and batched > 1  # faster than real time, counted in samples of speech
        assert float(row[3].strip().rstrip("x")) == pytest.approx(batched / each, abs=0.03)
