"""Stock chatterbox against this server's engine, on the same weights, text and token count.

    python bench.py --model turbo|standard --tokens N [--device cpu|cuda] [--runs R]
                    [--dtype ...] [--quantize int8] [--compile] [--compile-mode ...] [--no-cuda-graphs]
    python bench.py --concurrency N[,M...] --tokens N ...    N streams batched vs one slot at a time
    python bench.py --s3gen --tokens N [--plan SCHEDULE:CONTEXT ...]   S3Gen per streamed vs whole-file token

Weights: MODEL_DIR if set (real checkpoints), else random full-size ones built with
tools/random_checkpoint.py into .cache/bench/<model> on first use. Two copies are loaded:
stock runs chatterbox's own ChatterboxTTS/ChatterboxTurboTTS.generate() (capped at N speech
tokens, since a random T3 never stops), ours runs generations through the engine's batch with
the options given (the server's defaults otherwise): once as a whole file (as POST /v1/audio/speech
does; the end-to-end, T3 and S3Gen figures) and once streamed up to its first audio (the time
to first audio; stock's is its whole file). Runs alternate, stock first; each side is warmed
up once, and medians are reported. On CUDA the T3 and S3Gen times are CUDA events on the
stream (the totals are host time after a synchronize). The last line is
`speedup_e2e=<stock end-to-end real-time factor / ours>`.

--concurrency: for each N, N streams of the same text (seeds 0..N-1, N tokens each) submitted
together to a batch of max(N) slots with the lean streamed decode, against the same N one after
another in one slot with the window plan streams had before; alternating, medians. Prints
aggregate audio seconds per second, T3 tokens/s, S3Gen ms per token (and per whole-file token),
first audio p50/p95 of the batched streams; last line `speedup_batched=<batched / one at a time>`.
"""

from __future__ import annotations

import argparse
import functools
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
import numpy as np
import torch

import server

ROOT = Path(__file__).resolve().parent
TEXT = (
    "The quick brown fox jumps over the lazy dog while the afternoon sun warms the quiet garden, "
    "and somewhere a radio plays an old song about the sea."
)
# The three-sentence text of issue 12's measurements (BENCHMARKS.md passes it as --text).
THREE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog. Streaming speech should start long before the "
    "whole text is done. This third sentence closes the request."
)


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
            if isinstance(result, torch.Tensor):  # stock's T3 returns its tokens
                self.tokens += result.shape[-1]
            return result

        return timed

    def take(self) -> tuple[dict[str, float], int]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            seconds = {
                name: sum(start.elapsed_time(end) for start, end in marks) / 1000 for name, marks in self.spans.items()
            }
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
        base: float = torch.cuda.memory_allocated()
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
        subprocess.run(
            [sys.executable, str(ROOT / "tools" / "random_checkpoint.py"), str(path), "--model", model], check=True
        )
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

    def __init__(self, model: str, ckpt: Path, device: str, tokens: int, options: server.ModelOptions, timers: Timers):
        self.engine = server.ChatterboxEngine(model, str(ckpt), device, options=options)
        self.worker = ThreadRunner()
        self.runner = server.BatchRunner(self.engine)
        self.worker.call(self.engine.load)
        self.worker.call(self.runner.warm_up)
        self.voice = self.worker.call(lambda: self.engine.prepare_voice(server.BUILTIN_VOICE, 0.5))
        time_batch(self.engine, timers, (self.runner,))
        self.device, self.tokens, self.timers = device, tokens, timers

    def run(self, text: str) -> Run:
        def synthesize() -> Run:
            with peak_memory(self.device) as peak:
                start = time.perf_counter()
                (whole,) = generate(
                    self.runner, [(text, self.voice, server.SynthesisParams(streamed=False), 0)], self.tokens
                )
                sync(self.device)
                total = time.perf_counter() - start
            seconds, _ = self.timers.take()
            (stream,) = generate(
                self.runner, [(text, self.voice, server.SynthesisParams(), 0)], self.tokens, until_first_audio=True
            )
            self.timers.take()  # the stream's own T3 and S3Gen time is not part of the totals
            return Run(
                total,
                stream.first_audio,
                seconds["t3"],
                seconds["s3gen"],
                len(whole.tokens),
                whole.samples / server.NATIVE_SAMPLE_RATE,
                peak[0],
            )

        return self.worker.call(synthesize)


def time_batch(engine: server.ChatterboxEngine, timers: Timers, runners: tuple[server.BatchRunner, ...]) -> None:
    """Bill the runners' prefills and steps to "t3", the engine's S3Gen windows to "s3gen"."""
    for runner in runners:
        runner.prefill = timers.wrap("t3", runner.prefill)  # type: ignore[method-assign]
        runner.decode_block = timers.wrap("t3", runner.decode_block)  # type: ignore[method-assign]
    decoder = engine.loaded_s3gen()
    decoder.decode = timers.wrap("s3gen", decoder.decode)  # type: ignore[method-assign]


@dataclass
class Generated:
    tokens: list[int]
    samples: int
    first_audio: float  # seconds from the start of the run
    done: float


def seat_prompt(engine: server.ChatterboxEngine, prompt: torch.Tensor, slots: int) -> None:
    """The first `slots` slots of the engine's batch seated, each with `prompt` prefilled (the tools' steady
    batched steps)."""
    batch = engine.loaded_batch()
    for index in range(slots):
        hidden = batch.decoder.prefill(prompt, index)
        batch.seat(
            server.Slot(index, position=prompt.shape[1], budget=10**6),
            hidden,
            engine.recipe(server.SynthesisParams()),
            0.5,
            index,
        )


def generate(
    runner: server.BatchRunner,
    requests: list[tuple[str, Any, server.SynthesisParams, int]],
    max_tokens: int,
    until_first_audio: bool = False,
) -> list[Generated]:
    """Generations (text, voice, params, seed) submitted together and run through the engine's batch,
    one scheduler turn at a time, as the server's inference thread runs them."""
    start = time.perf_counter()
    results = [Generated([], 0, 0.0, 0.0) for _ in requests]
    generations = []
    for index, (text, voice, params, seed) in enumerate(requests):

        def deliver(event: Any, result: Generated = results[index]) -> None:
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, np.ndarray) and len(event):
                result.first_audio = result.first_audio or time.perf_counter() - start
                result.samples += len(event)
            if event is server.GENERATION_DONE:
                result.done = time.perf_counter() - start

        generation = server.Generation(
            text, voice, params, seed, server.Priority.REALTIME, index, deliver, max_tokens=max_tokens
        )
        generations.append(generation)
        runner.add(generation)
    while runner.busy:
        runner.turn()
        if until_first_audio and all(r.first_audio for r in results):
            for generation in generations:
                generation.cancelled = True
    for result, generation in zip(results, generations):
        result.tokens = generation.tokens
    return results


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


# --- S3Gen's cost per streamed token ---------------------------------------------


@dataclass
class Decoded:
    audio: np.ndarray
    mel: torch.Tensor  # the mel frames behind the audio, each from the window that voiced it
    seconds: float  # in S3Gen


def decode_as_streamed(
    engine: server.ChatterboxEngine,
    voice: Any,
    tokens: list[int],
    plan: server.StreamPlan | None,
    vocoder_seed: int | None = None,
) -> Decoded:
    """`tokens` through an S3GenStream as T3 would hand them over (plan None: a whole file)."""
    stream = server.S3GenStream(
        voice.gen, plan, len(tokens), engine.kind == "turbo", engine.device, engine.loaded_parts().s3gen.dtype
    )
    if vocoder_seed is not None:
        stream.rng = server.RngStream(vocoder_seed)
    pieces, mels, seconds, decoder = [], [], 0.0, engine.loaded_s3gen()

    def decode(window: server.S3GenWindow) -> None:
        nonlocal seconds
        start = time.perf_counter()
        mel = decoder.flow([window])  # what S3GenDecoder.decode does, keeping the mel
        pieces.append(server.as_array(server.to_host(stream.take(window, decoder.vocode([window], mel)[0]))))
        seconds += time.perf_counter() - start
        mels.append(mel[0][:, server.HIFT_OVERLAP_FRAMES if window.start else 0 :])

    for token in tokens:
        stream.push(token)
        if (window := stream.ready()) is not None:
            decode(window)
    decode(stream.final_window())
    return Decoded(np.concatenate(pieces), torch.cat(mels, dim=1), seconds)


def decode_as_before(
    engine: server.ChatterboxEngine, voice: Any, tokens: list[int], noise: torch.Tensor | None
) -> Decoded:
    """S3Gen as streams used it before the lean decode, for comparison: windows of 20, then 40 new
    tokens, each flowing 80 tokens of context again and vocoding its whole window, joined with
    20 ms crossfades."""
    from chatterbox.models.s3gen.const import S3GEN_SIL
    from chatterbox.models.s3gen.s3gen import S3Token2Mel

    s3gen, options = engine.loaded_parts().s3gen, engine.options
    seq: list[int] = []
    joiner = server.ChunkJoiner(480)
    pieces, kept, seconds = [], [], 0.0

    def decode(start: int, end: int, final: bool) -> None:
        nonlocal seconds
        began = time.perf_counter()
        first = max(0, start - 80)
        last = end if final else min(len(seq), end + 5)
        half = options.s3gen_dtype != torch.float32
        with torch.autocast(device_type=engine.device, dtype=options.s3gen_dtype, enabled=half):
            mels = S3Token2Mel.forward(
                s3gen,
                torch.tensor(seq[first:last], device=engine.device),
                ref_wav=None,
                ref_sr=None,
                ref_dict=dict(voice.gen),
                n_cfm_timesteps=2 if engine.kind == "turbo" else 10,
                finalize=True,
                noised_mels=None if noise is None else noise[None, :, 2 * first : 2 * last],
            )
        wav = s3gen.hift_inference(mels.to(s3gen.dtype), None)[0][0]
        if first == 0:
            wav[: len(s3gen.trim_fade)] *= s3gen.trim_fade[: len(wav)]
        lo = (start - first) * 960 - (480 if start else 0)
        audio = joiner.push(wav[lo : (end - first) * 960 if not final else len(wav)], start > 0)
        if final:
            audio = torch.cat([audio, joiner.finish()])
        pieces.append(server.as_array(server.to_host(audio)))
        seconds += time.perf_counter() - began
        kept.append(mels[0, :, 2 * (start - first) : 2 * (end - first)])

    emitted = 0
    for token in tokens:
        seq.append(token)
        end = len(seq) - 5
        if end - emitted >= (40 if emitted else 20):
            decode(emitted, end, False)
            emitted = end
    if engine.kind == "turbo":
        seq += [S3GEN_SIL] * 3
    decode(emitted, len(seq), True)
    return Decoded(np.concatenate(pieces), torch.cat(kept, dim=1), seconds)


@dataclass
class S3GenCost:
    """S3Gen's milliseconds per speech token, and how far the streamed result is from the one-pass decode
    (energy of the difference relative to the one pass, in dB)."""

    ms_per_token: float
    vs_whole: float  # median over runs of this way's time over the whole file's in the same run
    error_db: float  # audio; "whole": a second one-pass decode with other vocoder noise, the floor
    mel_error_db: float  # the flow's mel frames (no vocoder noise)


def db(signal: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> float:
    signal, reference = np.asarray(signal, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(10 * np.log10((np.sum(signal**2) + 1e-20) / np.sum(reference**2)))


def s3gen_costs(
    engine: server.ChatterboxEngine,
    voice: Any,
    tokens: list[int],
    plans: dict[str, server.StreamPlan | None],
    runs: int,
) -> dict[str, S3GenCost]:
    """S3Gen per token for each way of decoding `tokens` (name -> plan; "whole": one pass; "before":
    decode_as_before), alternating the ways within each run; medians over runs (and of the ratio to the
    whole file within each run, which this shared machine's drifting load spoils less). Every way gets the
    same flow noise within a run; "whole"'s error is a second one pass with other vocoder noise."""
    decode_as_streamed(engine, voice, tokens[:30], None)  # warm-up
    times: dict[str, list[float]] = {}
    errors: dict[str, list[tuple[float, float]]] = {}
    for run in range(runs):
        torch.manual_seed(run)
        whole = decode_as_streamed(engine, voice, tokens, None)
        results = {"whole": whole}
        for name, plan in plans.items():
            torch.manual_seed(run)  # the same noise for every way within a run
            if name == "before":
                stream = server.S3GenStream(
                    voice.gen,
                    None,
                    len(tokens),
                    engine.kind == "turbo",
                    engine.device,
                    engine.loaded_parts().s3gen.dtype,
                )
                noise = stream.noise[:, stream.prompt_frames :] if engine.kind == "turbo" else None
                results[name] = decode_as_before(engine, voice, tokens, noise)
            else:
                results[name] = decode_as_streamed(engine, voice, tokens, plan)
        if not run:  # the floor: the vocoder's own noise
            torch.manual_seed(run)
            floor = decode_as_streamed(engine, voice, tokens, None, vocoder_seed=run + 1000)
            errors["whole"] = [(db(floor.audio - whole.audio, whole.audio), db(floor.mel - whole.mel, whole.mel))]
        for name, result in results.items():
            times.setdefault(name, []).append(result.seconds)
            if name != "whole":
                errors.setdefault(name, []).append(
                    (db(result.audio - whole.audio, whole.audio), db(result.mel - whole.mel, whole.mel))
                )
        print(
            f"run {run}: "
            + "  ".join(f"{name}={1000 * result.seconds / len(tokens):.1f}ms" for name, result in results.items()),
            flush=True,
        )
    return {
        name: S3GenCost(
            1000 * statistics.median(times[name]) / len(tokens),
            statistics.median(t / w for t, w in zip(times[name], times["whole"])),
            statistics.median(e[0] for e in errors[name]),
            statistics.median(e[1] for e in errors[name]),
        )
        for name in times
    }


def parse_plan(text: str) -> server.StreamPlan:
    schedule, _, context = text.partition(":")
    return server.StreamPlan(
        tuple(int(size) for size in schedule.split(",")), int(context or server.StreamPlan().context_tokens)
    )


def s3gen_main(args: argparse.Namespace, options: server.ModelOptions) -> None:
    ckpt = checkpoint(args.model)
    engine = server.ChatterboxEngine(args.model, str(ckpt), args.device, options=options)
    runner = ThreadRunner()
    runner.call(engine.load)
    voice = runner.call(lambda: engine.prepare_voice(server.BUILTIN_VOICE, 0.5))
    tokens = torch.randint(0, server.SPEECH_CODEBOOK, (args.tokens,), generator=torch.Generator().manual_seed(0))
    plans: dict[str, server.StreamPlan | None] = {"before": None}
    plans.update(
        {
            text: parse_plan(text)
            for text in args.plan or [",".join(map(str, engine.stream.schedule)) + f":{engine.stream.context_tokens}"]
        }
    )
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, model {args.model}, "
        f"weights {ckpt}, tokens {args.tokens}, runs {args.runs}",
        flush=True,
    )
    costs = runner.call(lambda: s3gen_costs(engine, voice, tokens.tolist(), plans, args.runs))
    for name, cost in costs.items():
        print(
            f"s3gen {name:24s} ms_per_token={cost.ms_per_token:.1f}  vs_whole={cost.vs_whole:.2f}"
            f"  error_db={cost.error_db:.1f}  mel_error_db={cost.mel_error_db:.1f}",
            flush=True,
        )
    lean = next(name for name in costs if name not in ("whole", "before"))
    print(f"s3gen_streamed_vs_whole={costs[lean].vs_whole:.3f}")


# --- Concurrency: N generations batched against the same N one slot at a time ---------------------


@dataclass
class Load:
    """One run of N generations: how much audio came out per second, and where the time went."""

    wall: float
    audio: float  # seconds of audio, all generations
    tokens: int  # speech tokens, all generations
    t3: float  # seconds in T3 (prefills and steps)
    s3gen: float  # seconds in S3Gen
    first_audio: list[float] = field(default_factory=list)  # per generation, seconds from the start


def batched_load(runner: server.BatchRunner, voice: Any, text: str, count: int, tokens: int, timers: Timers) -> Load:
    """`count` streams submitted together and decoded side by side (the lean streamed decode)."""
    requests = [(text, voice, server.SynthesisParams(), seed) for seed in range(count)]
    start = time.perf_counter()
    results = generate(runner, requests, tokens)
    wall = time.perf_counter() - start
    seconds, _ = timers.take()
    return Load(
        wall,
        sum(r.samples for r in results) / server.NATIVE_SAMPLE_RATE,
        sum(len(r.tokens) for r in results),
        seconds.get("t3", 0.0),
        seconds.get("s3gen", 0.0),
        [r.first_audio for r in results],
    )


def one_at_a_time_load(
    runner: server.BatchRunner, voice: Any, text: str, count: int, tokens: int, timers: Timers
) -> Load:
    """The same generations one after another, one slot, with the window plan streams had before
    (`decode_as_before`): what the server did with N streams before batching."""
    engine, start = runner.engine, time.perf_counter()
    audio, produced, s3gen, firsts = 0.0, 0, 0.0, []
    for seed in range(count):
        began = time.perf_counter()
        (result,) = generate(runner, [(text, voice, server.SynthesisParams(), seed)], tokens)
        torch.manual_seed(seed)
        stream = server.S3GenStream(
            voice.gen,
            None,
            len(result.tokens),
            engine.kind == "turbo",
            engine.device,
            engine.loaded_parts().s3gen.dtype,
        )
        noise = stream.noise[:, stream.prompt_frames :] if engine.kind == "turbo" else None
        decoded = decode_as_before(engine, voice, [t for t in result.tokens if t < server.SPEECH_CODEBOOK], noise)
        firsts.append(began - start)  # sequential: not comparable, kept out of the report
        audio += len(decoded.audio) / server.NATIVE_SAMPLE_RATE
        produced += len(result.tokens)
        s3gen += decoded.seconds
    seconds, _ = timers.take()
    return Load(time.perf_counter() - start, audio, produced, seconds.get("t3", 0.0), s3gen, firsts)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def concurrency_main(args: argparse.Namespace, options: server.ModelOptions) -> None:
    from dataclasses import replace

    levels = [int(n) for n in args.concurrency.split(",")]
    ckpt = checkpoint(args.model)
    worker = ThreadRunner()
    engine = server.ChatterboxEngine(
        args.model, str(ckpt), args.device, options=replace(options, max_batch=max(levels))
    )
    batched = server.BatchRunner(engine)
    worker.call(engine.load)
    worker.call(batched.warm_up)
    voice = worker.call(lambda: engine.prepare_voice(server.BUILTIN_VOICE, 0.5))
    timers = Timers(args.device)
    batches = {batched: engine.batch}
    engine.options = replace(engine.options, max_batch=1)
    single = server.BatchRunner(engine)
    batches[single] = worker.call(engine.build_batch)
    time_batch(engine, timers, (batched, single))
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, model {args.model}, "
        f"weights {ckpt}, tokens {args.tokens}, runs {args.runs}, quantize {engine.options.quantize}",
        flush=True,
    )

    def use(runner: server.BatchRunner) -> server.BatchRunner:
        engine.batch = batches[runner]  # the runners share the engine, each with its own batch
        return runner

    def whole_ms_per_token() -> float:
        torch.manual_seed(0)
        tokens = torch.randint(0, server.SPEECH_CODEBOOK, (args.tokens,), generator=torch.Generator().manual_seed(0))
        return 1000 * decode_as_streamed(engine, voice, tokens.tolist(), None).seconds / args.tokens

    speedup = 0.0
    for count in levels:
        loads: dict[str, list[Load]] = {"one_at_a_time": [], "batched": []}
        whole = []
        for run in range(args.runs):  # alternating, in one process, on the same weights
            runner = use(single)
            loads["one_at_a_time"].append(
                worker.call(functools.partial(one_at_a_time_load, runner, voice, args.text, count, args.tokens, timers))
            )
            runner = use(batched)
            loads["batched"].append(
                worker.call(functools.partial(batched_load, runner, voice, args.text, count, args.tokens, timers))
            )
            whole.append(worker.call(whole_ms_per_token))
            print(
                f"  run {run}: "
                + "  ".join(f"{name} {load[-1].audio / load[-1].wall:.3f} audio s/s" for name, load in loads.items()),
                flush=True,
            )
        rows = {}
        for name, runs in loads.items():
            rows[name] = {
                "audio_s_per_s": statistics.median(r.audio / r.wall for r in runs),
                "t3_tokens_per_s": statistics.median(r.tokens / r.t3 for r in runs),
                "s3gen_ms_per_token": statistics.median(1000 * r.s3gen / r.tokens for r in runs),
            }
            if name == "batched":
                firsts = [f for r in runs for f in r.first_audio]
                rows[name] |= {
                    "first_audio_p50_s": percentile(firsts, 0.5),
                    "first_audio_p95_s": percentile(firsts, 0.95),
                }
            print(
                f"concurrency {count} {name:14s} " + "  ".join(f"{k}={v:.3f}" for k, v in rows[name].items()),
                flush=True,
            )
        ratios = [b.audio / b.wall / (o.audio / o.wall) for b, o in zip(loads["batched"], loads["one_at_a_time"])]
        speedup = statistics.median(ratios)
        print(
            f"concurrency {count} s3gen_ms_per_whole_file_token={statistics.median(whole):.1f}  "
            f"t3_batched_vs_one_stream={rows['batched']['t3_tokens_per_s'] / rows['one_at_a_time']['t3_tokens_per_s']:.2f}"
            f"  speedup_runs={','.join(f'{r:.2f}' for r in ratios)}",
            flush=True,
        )
    print(f"speedup_batched={speedup:.3f}")


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
    parser.add_argument(
        "--s3gen",
        action="store_true",
        help="only S3Gen's cost per streamed token against a whole file's, on --tokens random tokens",
    )
    parser.add_argument(
        "--concurrency",
        metavar="N[,M...]",
        help="N streams batched against the same N one slot at a time (with the window plan streams "
        "had before), for each N; last line speedup_batched= for the last N",
    )
    parser.add_argument(
        "--plan",
        action="append",
        metavar="SCHEDULE[:CONTEXT]",
        help="with --s3gen: a window plan to measure, e.g. 20,40,80,160:24 (repeatable)",
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    server.set_torch_threads(int(os.environ.get("TORCH_THREADS", "0")))  # as the server sets them
    options = server.ModelOptions(args.dtype, args.quantize, args.compile, args.compile_mode, not args.no_cuda_graphs)
    if args.s3gen:
        s3gen_main(args, options)
        return
    if args.concurrency:
        concurrency_main(args, options)
        return
    ckpt = checkpoint(args.model)
    timers = Timers(args.device)
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"model {args.model}, weights {ckpt}, tokens {args.tokens}, runs {args.runs}",
        flush=True,
    )
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
    print(
        "ratio  "
        + "  ".join(f"{k}={our_row[k] / stock_row[k]:.3f}" for k in ("t3_tokens_per_s",))
        + f"  s3gen_speedup={stock_row['s3gen_rtf'] / our_row['s3gen_rtf']:.3f}"
        f"  first_audio_speedup={stock_row['first_audio_s'] / our_row['first_audio_s']:.3f}"
    )
    print(f"speedup_e2e={stock_row['e2e_rtf'] / our_row['e2e_rtf']:.3f}")


if __name__ == "__main__":
    main()
