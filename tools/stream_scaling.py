"""N streams batched against one, in one process: wall time and T3/S3Gen seconds of each, alternating.

python tools/stream_scaling.py CHECKPOINT [S3GEN_BATCH]   # Turbo; 1 and 4 streams, two rounds
"""

import functools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import server  # noqa: I001  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
import bench

TEXT = bench.THREE_SENTENCES

engine = server.ChatterboxEngine(
    "turbo",
    sys.argv[1],
    "cpu",
    options=server.ModelOptions(max_batch=8),
    s3gen_batch=int(sys.argv[2]) if len(sys.argv) > 2 else 0,
)
runner = server.BatchRunner(engine)
worker = bench.ThreadRunner()
worker.call(engine.load)
worker.call(runner.warm_up)
voice = worker.call(lambda: engine.prepare_voice(server.BUILTIN_VOICE, 0.5))
timers = bench.Timers("cpu")
bench.time_batch(engine, timers, (runner,))
for _ in range(2):
    for count in (1, 4):
        requests = [(TEXT, voice, server.SynthesisParams(), seed) for seed in range(count)]
        start = time.perf_counter()
        results = worker.call(functools.partial(bench.generate, runner, requests, server.speech_token_budget(TEXT)))
        wall = time.perf_counter() - start
        seconds, _ = timers.take()
        print(
            f"{count} streams: wall {wall:.2f} s, t3 {seconds.get('t3', 0):.2f} s, s3gen {seconds.get('s3gen', 0):.2f} s,"
            f" tokens {[len(r.tokens) for r in results]}, first audio {[round(r.first_audio, 2) for r in results]}",
            flush=True,
        )
