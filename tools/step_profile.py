"""Where a batched T3 step's time goes: {slots} prefills, then 40 steps over 8 busy slots, and one step profiled.

    MODEL_DIR=/path/to/turbo python tools/step_profile.py [QUANTIZE] [SLOTS]
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import server  # noqa: I001  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
import torch

quantize = sys.argv[1] if len(sys.argv) > 1 else "int8"
slots = int(sys.argv[2]) if len(sys.argv) > 2 else 8
engine = server.ChatterboxEngine("turbo", os.environ["MODEL_DIR"], "cpu",
                                 options=server.ModelOptions(quantize=quantize, max_batch=slots))
with torch.inference_mode():
    engine.load()
    voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
    batch = engine.batch
    text = ("The quick brown fox jumps over the lazy dog. Streaming speech should start long before the whole "
            "text is done. This third sentence closes the request.")
    prompt = engine.prompt(text, voice, server.SynthesisParams())[0]
    print("prompt tokens", prompt.shape[1])
    start = time.perf_counter()
    for index in range(slots):
        hidden = batch.decoder.prefill(prompt, index)
        batch.seat(server.Slot(index, position=prompt.shape[1], budget=10**6), hidden,
                   engine.recipe(server.SynthesisParams()), 0.5, index)
    print(f"{slots} prefills {time.perf_counter() - start:.1f} s")
    times = []
    for _ in range(40):
        start = time.perf_counter()
        batch.step()
        batch.read_tokens()
        times.append(time.perf_counter() - start)
    print(f"{slots}-row step median {1000 * statistics.median(times):.0f} ms", [round(1000 * x) for x in times[::4]])
    from torch.profiler import profile
    with profile() as p:
        batch.step(); batch.read_tokens()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
