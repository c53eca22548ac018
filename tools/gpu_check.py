"""Validate the CUDA path on a GPU in one command, and write one Markdown table for BENCHMARKS.md.

    python tools/gpu_check.py [--out FILE] [--checkpoints DIR] [--models turbo,standard,multilingual]
                              [--options NAME,...] [--skip STEP,...] [--jobs N] [--timeout S] [--dry-run]

(`make gpu-check` runs it.) Steps, each a row or more of the table:
  checkpoints  random full-size checkpoints (tools/random_checkpoint.py) in DIR/<model>, built once
  tests        the `cuda`-marked tests of server_test.py, on this GPU
  warmup       every model with every option of OPTIONS, each loaded, warmed up (graphs captured,
               steps compiled) and made to speak in a process of its own, --jobs at a time: ok,
               fell back (a warning says what ran instead) or failed with the error
  sync         T3's decode steps under torch.cuda.set_sync_debug_mode("error") (any host sync in a step
               fails), then the whole token loop, its syncs counted against its end-of-speech reads
  kernels      device kernels per decode step (torch.profiler)
  speed        T3 decode steps/s at the model's batch (Turbo: 1 row) against the weight-read limit:
               measured device bandwidth / bytes of the weights a step reads
  bench        bench.py --device cuda (Turbo, defaults and QUANTIZE=int8)
Every model process runs alone for sync, kernels and speed (warm-ups may share the GPU).

--dry-run does the same on the CPU with tiny checkpoints (host reads stand in for syncs, aten ops for
kernels), so that the script is not run for the first time on a GPU. Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ("turbo", "standard", "multilingual")
STEPS = ("checkpoints", "tests", "warmup", "sync", "kernels", "speed", "bench")
OPTIONS: dict[str, dict[str, Any]] = {  # names as the settings spell them; values as ModelOptions' fields
    "defaults": {},
    "DTYPE=float16": {"dtype": "float16"},
    "DTYPE=float32": {"dtype": "float32"},
    "QUANTIZE=int8": {"quantize": "int8"},
    "CUDA_GRAPHS=false": {"cuda_graphs": False},
    "ATTENTION=eager": {"attention": "eager"},
    "TORCH_COMPILE=true": {"torch_compile": True},
    "TORCH_COMPILE_MODE=reduce-overhead": {"torch_compile": True, "compile_mode": "reduce-overhead"},
    "TORCH_COMPILE_MODE=max-autotune": {"torch_compile": True, "compile_mode": "max-autotune"},
    "QUANTIZE=int8+TORCH_COMPILE=true": {"quantize": "int8", "torch_compile": True},
}
MEASURED = {"turbo": ("defaults", "QUANTIZE=int8"), "standard": ("defaults",), "multilingual": ("defaults",)}
TURBO_TARGET_STEPS_S = 1000  # the GPU issue's target for Turbo at batch 1 on an H100/H200
HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero")


@dataclass
class Row:
    check: str
    model: str = ""
    options: str = ""
    result: str = "ok"  # ok, fell back, failed, timeout, skipped, or a figure
    figure: str = ""
    details: str = ""

    @property
    def failed(self) -> bool:
        return self.result in ("failed", "timeout")


# --- The decoder's API: every call into T3Decoder, DecodeStep and the token loop is here -----------


def load_engine(kind: str, checkpoint: Path, device: str, options: dict[str, Any]) -> Any:
    """A loaded and warmed-up engine, as the server's inference thread makes it (in inference mode)."""
    import server

    engine = server.ChatterboxEngine(kind, str(checkpoint), device, options=server.ModelOptions(**options))
    engine.load()
    server.BatchRunner(engine).warm_up()
    return engine


@contextmanager
def prefilled(engine: Any, prompt: int) -> Iterator[Callable[[int], Any]]:
    """Slot 0 of the batch prefilled with a random prompt of `prompt` positions and seated, and `step(i)`
    running batched step i (on CUDA the graphs warm_up captured; tokens read every eos_check_every steps)."""
    import torch

    import server

    batch = engine.batch
    decoder = batch.decoder
    device = decoder.final_norm.weight.device
    hidden = decoder.prefill(torch.randn(decoder.rows_per_slot, prompt, decoder.dim, device=device), 0)
    monitor = engine.alignment_monitor(4, 10) if batch.monitored else None  # Multilingual's, over a made-up text
    slot = server.Slot(0, position=prompt, budget=10**9, monitor=monitor)
    batch.seat(slot, hidden, engine.recipe(server.SynthesisParams()), 0.5, seed=0)

    def step(i: int) -> None:
        batch.step()
        if batch.block_full:
            batch.read_tokens()

    try:
        yield step
    finally:
        batch.leave(slot)
        batch.reset()


def token_loop(engine: Any, budget: int) -> Iterator[int]:
    """T3's speech tokens for a sentence, through the batch as the server runs it (prefill, sampling on
    the device, stop-token reads, probes), yielded as the runner hands them over."""
    import server

    voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    done: list[Any] = []
    generation = server.Generation(
        "Checking the token loop for host syncs, one step at a time.",
        voice,
        server.SynthesisParams(),
        0,
        server.Priority.REALTIME,
        0,
        done.append,
        max_tokens=budget,
        vocode=False,
    )
    runner = server.BatchRunner(engine)
    runner.add(generation)
    given = 0
    while not any(event is server.GENERATION_DONE for event in done):
        runner.turn()
        yield from generation.tokens[given:]
        given = len(generation.tokens)


def weight_bytes(engine: Any) -> int:
    """Bytes of the weights one decode step reads: T3's layers and final norm, each tensor once."""
    decoder = engine.batch.decoder
    tensors = [*decoder.layers.parameters(), *decoder.layers.buffers(), *decoder.final_norm.parameters()]
    for module in decoder.layers.modules():  # int8 weights that are not parameters
        if callable(getattr(module, "weight", None)):  # the CPU's row-scaled int8 Linear
            tensors.append(module.weight())
        if getattr(getattr(module, "state", None), "SCB", None) is not None:  # bitsandbytes' weight scales
            tensors.append(module.state.SCB)
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())


def eos_check_every(engine: Any) -> int:
    return engine.options.eos_check_every


def batch_rows(engine: Any) -> int:
    return engine.batch.decoder.rows


# --- Work done in a process of its own (a sticky CUDA error or a leak stays there) ------------------


def warm_up_task(kind: str, checkpoint: Path, device: str, option: str) -> list[Row]:
    import numpy as np
    import torch

    import server

    started = time.perf_counter()
    with torch.inference_mode():
        engine = load_engine(kind, checkpoint, device, OPTIONS[option])
        warm = time.perf_counter() - started
        voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
        audio = np.concatenate(
            [
                server.as_array(piece)
                for piece in server.run_alone(
                    server.BatchRunner(engine),
                    "Every option must warm up and speak.",
                    voice,
                    server.SynthesisParams(),
                    max_tokens=60 if device == "cuda" else 25,
                )
            ]
        )  # two streamed windows on CUDA, one on CPU
    if not len(audio) or not np.isfinite(audio).all():
        return [Row("warm-up", kind, option, "failed", details="no audio, or not finite")]
    described = engine.describe()
    ran = ", ".join(
        f"{key}={described[key]}" for key in ("dtype", "quantize", "compile_mode", "cuda_graphs", "attention")
    )
    result = "fell back" if engine.option_warnings else "ok"
    return [
        Row(
            "warm-up",
            kind,
            option,
            result,
            f"{warm:.1f} s load+warm-up",
            "; ".join([f"ran {ran}", *engine.option_warnings]),
        )
    ]


def measure_task(kind: str, checkpoint: Path, device: str, option: str, steps: int, skip: set[str]) -> list[Row]:
    import torch

    cuda = device == "cuda"
    rows = []
    with torch.inference_mode():
        engine = load_engine(kind, checkpoint, device, {**OPTIONS[option], "max_batch": 1})  # batch-1 figures
        if "sync" not in skip:
            rows += [step_sync_row(engine, kind, option, steps, cuda), loop_sync_row(engine, kind, option, cuda)]
        if "kernels" not in skip:
            rows.append(kernels_row(engine, kind, option, cuda))
        if "speed" not in skip:
            rows.append(speed_row(engine, kind, option, steps, device))
    return rows


def named_reads(profile: Any) -> dict[str, int]:
    """How many times each read the token loop makes on purpose (server.expected_read) ran."""
    import server

    return dict(
        Counter(
            e.name.removeprefix(server.EXPECTED_READ)
            for e in profile.events()
            if e.name.startswith(server.EXPECTED_READ)
        )
    )


def stray_reads(profile: Any) -> list[str]:
    """Host reads (CPU) outside the expected ones."""
    import server

    def expected(event: Any) -> bool:
        while event is not None:
            if event.name.startswith(server.EXPECTED_READ):
                return True
            event = event.cpu_parent
        return False

    return [e.name for e in profile.events() if e.name in HOST_READS and not expected(e)]


def reads_in_blocks(reads: dict[str, int], tokens: int, every: int) -> str | None:
    """What is wrong with the named reads of `tokens` steps (None: nothing): the block's tokens are read
    once per block of `every` steps."""
    if reads.get("block tokens", 0) > math.ceil(tokens / every) + 1:
        return f"block tokens read {reads['block tokens']} times in {tokens} steps (every {every} expected)"
    return None


def described(reads: dict[str, int]) -> str:
    return "expected reads: " + (", ".join(f"{name} x{count}" for name, count in sorted(reads.items())) or "none")


@contextmanager
def sync_debug(cuda: bool, mode: str) -> Iterator[None]:
    """torch.cuda.set_sync_debug_mode(mode) around the work alone: entered inside the profiler, so that its
    own start and stop are not counted (CPU: nothing)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)


def step_sync_row(engine: Any, kind: str, option: str, steps: int, cuda: bool) -> Row:
    """The decode steps, their expected reads let through (each by name) and any other read a failure:
    on CUDA under set_sync_debug_mode("error"), on CPU host reads stand in for syncs."""
    import torch

    with prefilled(engine, 200) as step:
        step(0)
        try:
            with (
                torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile,
                sync_debug(cuda, "error"),
            ):
                for i in range(1, steps):
                    step(i)
        except RuntimeError as error:
            return Row("sync: decode steps", kind, option, "failed", details=first_line(error))
    reads, stray = named_reads(profile), ([] if cuda else stray_reads(profile))
    problem = reads_in_blocks(reads, steps - 1, eos_check_every(engine))
    figure = f"0 other syncs in {steps - 1} steps" if cuda else f"{len(stray)} other host reads in {steps - 1} steps"
    how = 'set_sync_debug_mode("error")' if cuda else "CPU: reads stand in for syncs"
    return Row(
        "sync: decode steps",
        kind,
        option,
        "failed" if stray or problem else "ok",
        figure,
        "; ".join([how, described(reads), *([problem] if problem else []), *sorted(set(stray))]),
    )


def loop_sync_row(engine: Any, kind: str, option: str, cuda: bool) -> Row:
    """Syncs in the token loop after its first block (the prefill's are outside), besides its expected reads."""
    import torch

    every = eos_check_every(engine)
    budget = 8 * every + 1
    tokens = token_loop(engine, budget)
    next(tokens, None)  # the prefill and the first block
    with (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile,
        warnings.catch_warnings(record=True) as caught,
        sync_debug(cuda, "warn"),
    ):
        warnings.simplefilter("always")
        consumed = sum(1 for _ in tokens)
    if cuda:
        syncs = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    else:
        syncs = stray_reads(profile)
    reads = named_reads(profile)
    problem = reads_in_blocks(reads, consumed, every)
    # On CPU, kernels read their own arguments (`item()` is no sync there): a figure, not a verdict.
    verdict = ("failed" if syncs or problem else "ok") if cuda else "info"
    return Row(
        "sync: token loop",
        kind,
        option,
        verdict,
        f"{len(syncs)} other syncs / {consumed} tokens",
        "; ".join(
            [f"EOS read every {every} tokens", described(reads), *([problem] if problem else []), *sorted(set(syncs))]
        ),
    )


def kernels_row(engine: Any, kind: str, option: str, cuda: bool, steps: int = 20) -> Row:
    import torch

    with prefilled(engine, 200) as step:
        step(0)
        if cuda:
            torch.cuda.synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as profile:
                for i in range(1, steps + 1):
                    step(i)
                torch.cuda.synchronize()
            events = profile.events()
            kernels = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
            launches = {name: sum(e.name == name for e in events) for name in ("cudaGraphLaunch", "cudaLaunchKernel")}
            return Row(
                "kernels",
                kind,
                option,
                f"{kernels / steps:.0f} per step",
                "device kernels and copies",
                f"graph launches {launches['cudaGraphLaunch'] / steps:.0f}/step, direct launches "
                f"{launches['cudaLaunchKernel'] / steps:.0f}/step",
            )
        from torch.utils._python_dispatch import TorchDispatchMode

        class Count(TorchDispatchMode):
            def __init__(self) -> None:
                super().__init__()
                self.ops = 0

            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                self.ops += 1
                return func(*args, **(kwargs or {}))

        with Count() as counted:
            for i in range(1, steps + 1):
                step(i)
        return Row("kernels", kind, option, f"{counted.ops / steps:.0f} per step", "aten ops (CPU)")


def speed_row(engine: Any, kind: str, option: str, steps: int, device: str) -> Row:
    import torch

    cuda = device == "cuda"
    with prefilled(engine, 200) as step:
        step(0)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for i in range(1, steps + 1):
                step(i)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            started = time.perf_counter()
            for i in range(1, steps + 1):
                step(i)
            seconds = time.perf_counter() - started
    rate, weights, bandwidth = steps / seconds, weight_bytes(engine), device_bandwidth(device)
    limit = bandwidth / weights
    details = (
        f"{batch_rows(engine)} row(s); limit {limit:.0f} steps/s = {bandwidth / 1e9:.0f} GB/s over "
        f"{weights / 2**20:.1f} MiB of weights"
    )
    if kind == "turbo" and cuda:
        details += f"; target {TURBO_TARGET_STEPS_S}"
    return Row(
        "speed: T3 steps/s", kind, option, f"{rate:.0f}", f"{100 * rate / limit:.0f}% of the weight-read limit", details
    )


def device_bandwidth(device: str) -> float:
    """Bytes per second a large device-to-device copy moves (read plus write)."""
    import torch

    size = 2**30 if device == "cuda" else 2**27
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    repeats = 5
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            target.copy_(source)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        started = time.perf_counter()
        for _ in range(repeats):
            target.copy_(source)
        seconds = time.perf_counter() - started
    return 2 * size * repeats / seconds


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {(text.splitlines() or [''])[0]}"[:300]


# --- The orchestrating process ------------------------------------------------------------------


def run_in_process(task: dict[str, Any], timeout: float, label: Row) -> list[Row]:
    """Run one task (warm-up or measure) in a fresh interpreter; its rows, or one row saying why not."""
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--task", json.dumps(task)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return [Row(label.check, label.model, label.options, "timeout", f"> {timeout:.0f} s")]
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROWS ")]
    if done.returncode == 0 and lines:
        return [Row(**row) for row in json.loads(lines[-1][5:])]
    errors = [line for line in done.stderr.splitlines() if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    return [
        Row(
            label.check,
            label.model,
            label.options,
            "failed",
            details=(errors[-1] if errors else done.stderr.strip()[-300:]).replace("|", "/"),
        )
    ]


def task_main(task: dict[str, Any]) -> None:
    checkpoint, device = Path(task["checkpoint"]), task["device"]
    try:
        if task["kind"] == "warmup":
            rows = warm_up_task(task["model"], checkpoint, device, task["option"])
        else:
            rows = measure_task(task["model"], checkpoint, device, task["option"], task["steps"], set(task["skip"]))
    except Exception as error:  # reported as the row's error, not as this process's traceback
        check = "warm-up" if task["kind"] == "warmup" else "measure"
        rows = [Row(check, task["model"], task["option"], "failed", details=first_line(error).replace("|", "/"))]
    print("ROWS " + json.dumps([asdict(row) for row in rows]), flush=True)


def build_checkpoints(root: Path, models: list[str], tiny: bool) -> list[Row]:
    def build(model: str) -> Row:
        path = root / model
        if (path / "conds.pt").exists():
            return Row("checkpoint", model, result="ok", details=f"{path} (already built)")
        started = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tools" / "random_checkpoint.py"),
                str(path),
                "--model",
                model,
                "--seed",
                "0",
                *(["--tiny"] if tiny else []),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            return Row("checkpoint", model, result="failed", details=done.stderr.strip()[-300:])
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return Row(
            "checkpoint",
            model,
            result="ok",
            figure=f"{size / 2**20:.0f} MiB",
            details=f"built in {time.perf_counter() - started:.0f} s",
        )

    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(build, models))


def test_rows(device: str) -> list[Row]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "cuda",
            "-p",
            "no:cacheprovider",
            "--timeout=600",
            "server_test.py",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1].strip("= ")
    failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    ran = device == "cuda" and "passed" in summary
    result = "failed" if done.returncode or failed else ("ok" if ran else "skipped")
    return [Row("tests: pytest -m cuda", result=result, figure=summary, details="; ".join(failed)[:300])]


def bench_rows(checkpoint: Path, device: str, dry_run: bool) -> list[Row]:
    rows = []
    for extra in ([], ["--quantize", "int8"]):
        option = "QUANTIZE=int8" if extra else "defaults"
        size = ["--tokens", "12", "--runs", "1"] if dry_run else ["--tokens", "100", "--runs", "3"]
        done = subprocess.run(
            [sys.executable, "bench.py", "--model", "turbo", "--device", device, *size, *extra],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "MODEL_DIR": str(checkpoint)},
        )
        if done.returncode:
            rows.append(Row("bench.py", "turbo", option, "failed", details=done.stderr.strip()[-300:]))
            continue
        rows.append(bench_row(done.stdout, option, device))
        if dry_run:
            break  # the CPU's int8 is already in BENCHMARKS.md; once shows the parsing works
    levels, size = (
        ("1,2", ["--tokens", "30", "--runs", "1"]) if dry_run else ("1,8,32", ["--tokens", "250", "--runs", "2"])
    )
    done = subprocess.run(
        [sys.executable, "bench.py", "--model", "turbo", "--device", device, "--concurrency", levels, *size],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "MODEL_DIR": str(checkpoint)},
    )
    if done.returncode:
        rows.append(Row("bench.py --concurrency", "turbo", "defaults", "failed", details=done.stderr.strip()[-300:]))
    else:
        rows += concurrency_rows(done.stdout)
    return rows


def concurrency_rows(output: str) -> list[Row]:
    """bench.py --concurrency's lines, one row per level: batched against one slot at a time."""
    rows = []
    for line in output.splitlines():
        words = line.split()
        if line.startswith("concurrency ") and words[2] == "batched":
            figures = dict(word.split("=") for word in words[3:])
            rows.append(
                Row(
                    f"bench.py --concurrency {words[1]}",
                    "turbo",
                    "defaults",
                    f"{float(figures['audio_s_per_s']):.2f} audio s/s",
                    f"T3 {float(figures['t3_tokens_per_s']):.0f} tokens/s",
                    f"first audio p50 {figures['first_audio_p50_s']} s, p95 {figures['first_audio_p95_s']} s",
                )
            )
        elif line.startswith("speedup_batched="):
            rows.append(Row("bench.py --concurrency", "turbo", "defaults", line))
    return rows


def bench_row(output: str, option: str, device: str) -> Row:
    """One row from bench.py's output: its figures as "stock → ours"."""
    lines = output.strip().splitlines()
    table = {
        line.split()[0]: dict(item.split("=") for item in line.split()[1:])
        for line in lines
        if line.startswith(("stock ", "ours "))
    }
    stock, ours = table["stock"], table["ours"]
    figures = ", ".join(
        f"{name} {float(stock[key]):.3g} → {float(ours[key]):.3g}"
        for name, key in (
            ("T3 tokens/s", "t3_tokens_per_s"),
            ("S3Gen RTF", "s3gen_rtf"),
            ("first audio s", "first_audio_s"),
            ("e2e RTF", "e2e_rtf"),
            ("peak MB", "peak_mb"),
        )
    )
    speedup = lines[-1].split("=")[1]
    return Row("bench.py", "turbo", option, f"speedup_e2e {speedup}", f"{float(ours['tokens']):.0f} tokens", figures)


def machine(device: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = [f"torch {torch.__version__}"]
    for package in ("bitsandbytes", "triton"):
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            versions.append(f"no {package}")
    if device != "cuda":
        return f"CPU ({os.cpu_count()} cores), {', '.join(versions)}"
    props = torch.cuda.get_device_properties(0)
    return (
        f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}), "
        f"CUDA {torch.version.cuda}, {', '.join(versions)}"
    )


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "unknown") + (
        "-dirty" if git("status", "--porcelain", "-uno") else ""
    )


def markdown(rows: list[Row], device: str, command: str) -> str:
    header = [
        f"### `make gpu-check`, {date.today().isoformat()}",
        "",
        f"- Machine: {machine(device)}",
        f"- Commit: {commit()}",
        f"- Command: `{command}`",
        "",
        "| check | model | options | result | figure | details |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    return (
        "\n".join(
            header + [f"| {r.check} | {r.model} | {r.options} | {r.result} | {r.figure} | {r.details} |" for r in rows]
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "gpu-check" / "report.md")
    parser.add_argument("--checkpoints", type=Path, help="DIR/<model> (default: .cache/gpu-check/, built once)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"of: {', '.join(OPTIONS)}")
    parser.add_argument("--skip", default="", help=f"steps to leave out, of: {', '.join(STEPS)}")
    parser.add_argument("--jobs", type=int, default=None, help="warm-ups at once (default 4 on CUDA, 1 on CPU)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for one model process")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with tiny checkpoints")
    parser.add_argument("--task", help=argparse.SUPPRESS)  # a process of the orchestrator's
    args = parser.parse_args()
    if args.task:
        task_main(json.loads(args.task))
        return

    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: use --dry-run to run the checks on the CPU")
    models, skip = args.models.split(","), set(filter(None, args.skip.split(",")))
    options = args.options.split(",")
    unknown = (set(models) - set(MODELS)) | (set(options) - set(OPTIONS)) | (skip - set(STEPS))
    if unknown:
        raise SystemExit(f"unknown model, option or step: {', '.join(sorted(unknown))}")
    root = args.checkpoints or ROOT / ".cache" / ("gpu-check-tiny" if args.dry_run else "gpu-check")
    steps = 8 if args.dry_run else 300
    rows: list[Row] = []

    def report(new: list[Row]) -> None:
        for row in new:
            print(f"{row.check} {row.model} {row.options}: {row.result} {row.figure} {row.details}".strip(), flush=True)
        rows.extend(new)

    if "checkpoints" not in skip:
        report(build_checkpoints(root, models, tiny=args.dry_run))
    if "tests" not in skip:
        report(test_rows(device))

    def task(kind: str, model: str, option: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "model": model,
            "option": option,
            "checkpoint": str(root / model),
            "device": device,
            "steps": steps,
            "skip": sorted(skip),
        }

    if "warmup" not in skip:
        pairs = [(model, option) for model in models for option in options]
        with ThreadPoolExecutor(args.jobs or (4 if device == "cuda" else 1)) as pool:
            for result in pool.map(
                lambda pair: run_in_process(task("warmup", *pair), args.timeout, Row("warm-up", *pair)), pairs
            ):
                report(result)
    if {"sync", "kernels", "speed"} - skip:
        for model in models:
            for option in MEASURED[model]:
                if option in options:
                    report(run_in_process(task("measure", model, option), args.timeout, Row("measure", model, option)))
    if "bench" not in skip and "turbo" in models:
        report(bench_rows(root / "turbo", device, args.dry_run))

    command = "python tools/gpu_check.py " + " ".join(sys.argv[1:])
    table = markdown(rows, device, command.strip())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(f"\n{table}\nwritten to {args.out}")
    raise SystemExit(1 if any(row.failed for row in rows) else 0)


if __name__ == "__main__":
    main()
