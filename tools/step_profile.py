"""Where a batched T3 step's time goes, on full-size Turbo with the server's thread setting (TORCH_THREADS).

MODEL_DIR=/path/to/turbo python tools/step_profile.py [QUANTIZE] [SLOTS]
    SLOTS prefills, then 40 steps over SLOTS busy slots, and one step profiled.
MODEL_DIR=/path/to/turbo python tools/step_profile.py [QUANTIZE] --bound [KEYS]
    8 busy slots against 1, every slot attending over KEYS positions (default 480, the middle of the
    three-sentence text's 405 tokens), with the real attention and with attention costing nothing,
    alternating, three rounds: the aggregate ratio batching can reach, and what attention takes from it.
"""

import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import server  # noqa: I001  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
import torch

import bench
import t3_decoder


def profile_steps(engine: server.ChatterboxEngine, prompt: torch.Tensor, slots: int) -> None:
    batch = engine.loaded_batch()
    start = time.perf_counter()
    bench.seat_prompt(engine, prompt, slots)
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
        batch.step()
        batch.read_tokens()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def free_attention(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Attention costing nothing: zeros shaped as its query."""
    return torch.zeros_like(args[0] if args else kwargs["query"])


def bound(engine: server.ChatterboxEngine, prompt: torch.Tensor, keys: int) -> None:
    batch, length = engine.loaded_batch(), prompt.shape[1]
    hidden = batch.decoder.prefill(prompt, 0)
    for index in range(1, len(batch.slots)):  # every slot holds the same prompt
        batch.decoder.cache.put_prefix(batch.rows(index), batch.decoder.cache.prefix(batch.rows(0), length))
    position = keys - 1

    def median_step(count: int) -> float:
        for slot in batch.busy:
            batch.leave(slot)
        for index in range(count):
            batch.seat(
                server.Slot(index, position=position, budget=10**6),
                hidden,
                engine.recipe(server.SynthesisParams()),
                0.5,
                index,
            )
        times = []
        for _ in range(8):
            for slot in batch.busy:  # every step attends over `keys` positions
                slot.position = position
            start = time.perf_counter()
            batch.step()
            batch.read_tokens()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    real = t3_decoder.attend
    medians: dict[tuple[str, int], list[float]] = {}
    for _ in range(3):
        for count in (8, 1):
            for name, attend in (("real", real), ("free", free_attention)):
                t3_decoder.attend = attend
                medians.setdefault((name, count), []).append(median_step(count))
    t3_decoder.attend = real
    for name, label in (("real", "attention as served"), ("free", "attention costing nothing")):
        eight, one = statistics.median(medians[(name, 8)]), statistics.median(medians[(name, 1)])
        rounds = {count: "/".join(f"{1000 * x:.0f}" for x in medians[(name, count)]) for count in (8, 1)}
        print(
            f"{label}: 8 slots {1000 * eight:.0f} ms ({rounds[8]}), 1 slot {1000 * one:.0f} ms ({rounds[1]}), "
            f"aggregate {8 * one / eight:.2f}x"
        )


def main() -> None:
    args = sys.argv[1:]
    quantize = args.pop(0) if args and not args[0].startswith("-") else "int8"
    threads = server.set_torch_threads(int(os.environ.get("TORCH_THREADS", "0")))
    bounding = args[:1] == ["--bound"]
    slots = 8 if bounding or not args else int(args[0])
    engine = server.ChatterboxEngine(
        "turbo", os.environ["MODEL_DIR"], "cpu", options=server.ModelOptions(quantize=quantize, max_batch=slots)
    )
    with torch.inference_mode():
        engine.load()
        voice = engine.prepare_voice(server.BUILTIN_VOICE, 0.5)
        prompt = engine.prompt(bench.THREE_SENTENCES, voice, server.SynthesisParams())[0]
        print(f"{threads} thread(s), prompt {prompt.shape[1]} positions")
        if bounding:
            bound(engine, prompt, int(args[1]) if len(args) > 1 else 480)
        else:
            profile_steps(engine, prompt, slots)


if __name__ == "__main__":
    main()
