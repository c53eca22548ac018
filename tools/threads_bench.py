"""T3 batched steps and one S3Gen window with 1 vs 2 torch threads, with and without a busy 'event loop'
(a thread encoding mp3 with PyAV, as the server's event loop encodes responses). Alternating, medians.

    MODEL_DIR=/path/to/turbo python tools/threads_bench.py   # what TORCH_THREADS' default rests on
"""

import os
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import server  # noqa: I001  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP, unless set)
import torch

import bench

engine = server.ChatterboxEngine(
    "turbo", os.environ["MODEL_DIR"], "cpu", options=server.ModelOptions(quantize="int8", max_batch=8)
)
with torch.inference_mode():
    engine.load()
    voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    batch = engine.loaded_batch()
    prompt = engine.prompt("The quick brown fox jumps over the lazy dog.", voice, server.SynthesisParams())[0]
    bench.seat_prompt(engine, prompt, 8)

stop = threading.Event()


def encode_forever() -> None:
    audio = (0.1 * np.random.default_rng(0).standard_normal(24000)).astype(np.float32)
    while not stop.is_set():
        encoder = server.Encoder(server.AUDIO_FORMATS["mp3"], 24000)
        for _ in range(10):
            encoder.encode(audio)
        encoder.finish()


def steps(n: int = 12) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(n):
            t = time.perf_counter()
            batch.step()
            batch.read_tokens()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


tokens = torch.randint(0, 6561, (80,), generator=torch.Generator().manual_seed(0)).tolist()


def window() -> float:
    with torch.inference_mode():
        stream = engine.s3gen_stream(voice, True, 200)
        for t in tokens:
            stream.push(t)
        w = stream.ready()
        t0 = time.perf_counter()
        assert w is not None
        engine.loaded_s3gen().decode([w])
        return time.perf_counter() - t0


results: dict[tuple[int, bool], dict[str, list[float]]] = {}
steps(3)
window()
for rep in range(int(os.environ.get("RUNS", "3"))):
    for threads in (1, 2):
        for busy in (False, True):
            torch.set_num_threads(threads)
            encoder = None
            if busy:
                stop.clear()
                encoder = threading.Thread(target=encode_forever)
                encoder.start()
            r = results.setdefault((threads, busy), {"step": [], "window": []})
            r["step"].append(steps())
            r["window"].append(window())
            if encoder is not None:
                stop.set()
                encoder.join()
            print(rep, threads, busy, f"step {1000 * r['step'][-1]:.0f} ms, window {r['window'][-1]:.2f} s", flush=True)
print(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
for (threads, busy), r in results.items():
    print(
        f"threads={threads} busy_loop={busy} step_ms={1000 * statistics.median(r['step']):.0f} "
        f"({', '.join(f'{1000 * x:.0f}' for x in r['step'])}) window_s={statistics.median(r['window']):.2f} "
        f"({', '.join(f'{x:.2f}' for x in r['window'])})"
    )
