"""Stock chatterbox against this server's engine, on the same weights, text and token count.

    python bench.py --model turbo|standard --tokens N [--device cpu|cuda] [--runs R]
                    [--dtype ...] [--quantize int8] [--compile] [--compile-mode ...] [--no-cuda-graphs]

Weights: MODEL_DIR if set (real checkpoints), else random full-size ones built with
tools/random_checkpoint.py into .cache/bench/<model> on first use. Two copies are loaded:
stock runs chatterbox's own ChatterboxTTS/ChatterboxTurboTTS.generate() (capped at N speech
tokens, since a random T3 never stops), ours runs ChatterboxEngine.synthesize() with the
options given (the server's defaults otherwise): once as a whole file (as POST /v1/audio/speech
does; the end-to-end, T3 and S3Gen figures) and once streamed up to its first audio (the time
to first audio; stock's is its whole file). Runs alternate, stock first; each side is warmed
up once, and medians are reported. On CUDA the T3 and S3Gen times are CUDA events on the
stream (the totals are host time after a synchronize). The last line is
`speedup_e2e=<stock end-to-end real-time factor / ours>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

import server  # noqa: E402

ROOT = Path(__file__).resolve().parent
TEXT = ("The quick brown fox jumps over the lazy dog while the afternoon sun warms the quiet garden, "
        "and somewhere a radio plays an old song about the sea.")


@dataclass
class Run:
    total: float  # seconds, request in to last sample out
    first_audio: float  # seconds to the first audio sample (stock: the whole file)
    t3: float  # seconds in T3 (token generation)
    s3gen: float  # seconds in S3Gen (tokens to waveform)
    tokens: int
    audio: float  # seconds of audio
    peak_mb: float


@dataclass
class Timers:
    """Seconds spent inside wrapped callables, by name. On CUDA each span is timed on the stream with
    events: the host returns as soon as work is queued, and its clock would bill that GPU time to
    whichever part next waits for the device."""

    device: str = "cpu"
    spans: dict[str, list[tuple[Any, Any]]] = field(default_factory=dict)  # (start, end) marks
    tokens: int = 0  # speech tokens T3 produced

    def _mark(self) -> Any:
        if self.device == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()  # on the calling thread's current stream, where the wrapped work is queued
            return event
        return time.perf_counter()

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = self._mark()
        try:
            yield
        finally:
            self.spans.setdefault(name, []).append((start, self._mark()))

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.span(name):
                result = fn(*args, **kwargs)
            if name == "t3":
                self.tokens += result.shape[-1]
            return result

        return timed

    def wrap_iterator(self, name: str, fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            iterator = fn(*args, **kwargs)
            while True:
                with self.span(name):
                    item = next(iterator, StopIteration)
                if item is StopIteration:
                    return
                self.tokens += 1
                yield item

        return timed

    def take(self) -> tuple[dict[str, float], int]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            seconds = {name: sum(start.elapsed_time(end) for start, end in marks) / 1000
                       for name, marks in self.spans.items()}
        else:
            seconds = {name: sum(end - start for start, end in marks) for name, marks in self.spans.items()}
        tokens, self.spans, self.tokens = self.tokens, {}, 0
        return seconds, tokens


@contextmanager
def peak_memory(device: str) -> Iterator[list[float]]:
    """Peak memory above the starting point while the block runs (MB): CUDA allocator or process RSS.

    On CPU the kernel's high-water mark is reset first (no sampling thread to compete for the GIL).
    """
    result = [0.0]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result[0] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    base = proc_status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    yield result
    result[0] = max(0.0, proc_status_mb("VmHWM") - base)


def proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def checkpoint(model: str) -> Path:
    if os.environ.get("MODEL_DIR"):
        return Path(os.environ["MODEL_DIR"])
    path = ROOT / ".cache" / "bench" / model
    if not (path / "conds.pt").exists():
        print(f"building random full-size {model} weights in {path} (once)", flush=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "random_checkpoint.py"), str(path), "--model", model],
                       check=True)
    return path


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Stock:
    """chatterbox's own generate(), capped at `tokens` speech tokens."""

    def __init__(self, model: str, ckpt: Path, device: str, tokens: int, timers: Timers):
        from chatterbox.tts import ChatterboxTTS
        from chatterbox.tts_turbo import ChatterboxTurboTTS

        parts = server.load_chatterbox(model, ckpt, device)
        wrapper = ChatterboxTurboTTS if model == "turbo" else ChatterboxTTS
        self.tts = wrapper(parts.t3, parts.s3gen, parts.ve, parts.tokenizer, device, conds=parts.builtin)
        t3 = self.tts.t3
        if model == "turbo":  # inference_turbo samples one token before its loop of max_gen_len
            inference = t3.inference_turbo
            t3.inference_turbo = timers.wrap("t3", lambda **kw: inference(**{**kw, "max_gen_len": tokens - 1}))
        else:
            inference = t3.inference
            t3.inference = timers.wrap("t3", lambda **kw: inference(**{**kw, "max_new_tokens": tokens}))
        self.tts.s3gen.inference = timers.wrap("s3gen", self.tts.s3gen.inference)
        self.device, self.timers = device, timers

    def run(self, text: str) -> Run:
        with peak_memory(self.device) as peak:
            start = time.perf_counter()
            wav = self.tts.generate(text)
            sync(self.device)
            total = time.perf_counter() - start
        seconds, tokens = self.timers.take()
        return Run(total, total, seconds["t3"], seconds["s3gen"], tokens, wav.shape[-1] / self.tts.sr, peak[0])


class Ours:
    """This server's engine: a whole file for the totals, a stream's first chunk for first audio."""

    def __init__(self, model: str, ckpt: Path, device: str, tokens: int, options: server.ModelOptions,
                 timers: Timers):
        self.engine = server.ChatterboxEngine(model, str(ckpt), device, options=options)
        self.worker = ThreadRunner()
        self.worker.call(self.engine.load)
        self.worker.call(self.engine.warm_up)
        self.voice = self.worker.call(lambda: self.engine.prepare_voice(server.BUILTIN_VOICE, 0.5))
        self.engine._speech_tokens = timers.wrap_iterator("t3", self.engine._speech_tokens)
        self.engine._decode = timers.wrap("s3gen", self.engine._decode)
        self.device, self.tokens, self.timers = device, tokens, timers

    def run(self, text: str) -> Run:
        def synthesize() -> Run:
            with peak_memory(self.device) as peak:
                start = time.perf_counter()
                samples = sum(len(server.as_array(chunk)) for chunk in self.engine.synthesize(
                    text, self.voice, server.SynthesisParams(streamed=False), max_tokens=self.tokens))
                sync(self.device)
                total = time.perf_counter() - start
            seconds, tokens = self.timers.take()
            start = time.perf_counter()
            stream = self.engine.synthesize(text, self.voice, server.SynthesisParams(), max_tokens=self.tokens)
            next(chunk for chunk in stream if len(server.as_array(chunk)))
            first = time.perf_counter() - start
            stream.close()
            self.timers.take()  # the stream's own T3 and S3Gen time is not part of the totals
            return Run(total, first, seconds["t3"], seconds["s3gen"], tokens, samples / server.NATIVE_SAMPLE_RATE,
                       peak[0])

        return self.worker.call(synthesize)


class ThreadRunner:
    """Runs ours where the server runs it: one inference thread, inference mode, its own CUDA stream."""

    def __init__(self) -> None:
        self.result: Any = None

    def call(self, fn: Callable[[], Any]) -> Any:
        def target() -> None:
            with torch.inference_mode():
                self.result = fn()

        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
        return self.result


def median(runs: list[Run], key: Callable[[Run], float]) -> float:
    return statistics.median(key(run) for run in runs)


def report(name: str, runs: list[Run]) -> dict[str, float]:
    row = {
        "t3_tokens_per_s": median(runs, lambda r: r.tokens / r.t3),
        "s3gen_rtf": median(runs, lambda r: r.s3gen / r.audio),
        "first_audio_s": median(runs, lambda r: r.first_audio),
        "e2e_s": median(runs, lambda r: r.total),
        "e2e_rtf": median(runs, lambda r: r.total / r.audio),
        "peak_mb": max(r.peak_mb for r in runs),
        "tokens": median(runs, lambda r: r.tokens),
    }
    print(f"{name:6s} " + "  ".join(f"{k}={v:.3f}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("turbo", "standard", "multilingual"), default="turbo")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=("auto", *server.DTYPES), default="auto")
    parser.add_argument("--quantize", choices=("none", "int8"), default="none")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", choices=server.COMPILE_MODES, default="default")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--text", default=TEXT)
    args = parser.parse_args()

    torch.manual_seed(0)
    ckpt = checkpoint(args.model)
    options = server.ModelOptions(args.dtype, args.quantize, args.compile, args.compile_mode,
                                  not args.no_cuda_graphs)
    timers = Timers(args.device)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"model {args.model}, weights {ckpt}, tokens {args.tokens}, runs {args.runs}", flush=True)
    stock = Stock(args.model, ckpt, args.device, args.tokens, timers)
    ours = Ours(args.model, ckpt, args.device, args.tokens, options, timers)
    print(f"ours: {ours.engine.describe()}", flush=True)
    stock.run(args.text)  # warm-up (ours warmed up at load, as the server does)
    ours.run(args.text)
    stock_runs, our_runs = [], []
    for index in range(args.runs):
        torch.manual_seed(index)
        stock_runs.append(stock.run(args.text))
        torch.manual_seed(index)
        our_runs.append(ours.run(args.text))
    stock_row, our_row = report("stock", stock_runs), report("ours", our_runs)
    print("ratio  " + "  ".join(f"{k}={our_row[k] / stock_row[k]:.3f}" for k in ("t3_tokens_per_s",)) +
          f"  s3gen_speedup={stock_row['s3gen_rtf'] / our_row['s3gen_rtf']:.3f}"
          f"  first_audio_speedup={stock_row['first_audio_s'] / our_row['first_audio_s']:.3f}")
    print(f"speedup_e2e={stock_row['e2e_rtf'] / our_row['e2e_rtf']:.3f}")


if __name__ == "__main__":
    main()
