"""Piper's onnxruntime memory arena: throughput and RSS over repeated long calls, per configuration.

Throughput: one process loads server.PiperEngine (the bundled voice) once per configuration and synthesizes a
~190-word paragraph with each in turn, `--calls` times (the order rotates each time), so a shared machine's load
falls on all alike; audio seconds per wall second, median and spread (calls back to back: no lull between them).
RSS: each configuration in a fresh process of its own (so the memory is its own), `--rss-calls` calls, each
followed by a lull (the engine's `idle`): RSS after the first call, at the end, and its slope.

    .venv/bin/python tools/piper_arena.py --calls 10 --rss-calls 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more than a century, and for most of that time "
    "a keeper lived inside it, climbing the spiral stairs each evening to light the lamp. Ships passing in "
    "the night relied on its steady beam to find their way around the rocks that lay hidden beneath the "
    "waves. When the keepers were finally replaced by an automatic light, the village below held a small "
    "ceremony, and the last keeper, a quiet man named Thomas, handed the brass key to the mayor. He said "
    "that he would miss the sound of the wind against the glass, the smell of the oil, and the long hours "
    "of silence that gave him time to think. Today the tower is a museum, and visitors can climb the same "
    "stairs, look through the same windows, and read the logbooks in which every keeper wrote down the "
    "weather, the passing ships and the small events of their lonely days. Children love the view from the "
    "top, where on a clear afternoon you can see three islands and the distant coast of another country, "
    "while their parents linger over the photographs of storms that once shook the whole building."
)

CONFIGURATIONS = ("arena-off", "arena", "arena-shrink-each-run", "arena-shrink-when-idle")


def engine_for(configuration: str) -> Any:
    """server.PiperEngine as shipped ("arena-shrink-when-idle": the arena shrunk once the runner has nothing
    left to run), or with the arena off, as it once was ("arena-off"), on and never shrunk ("arena"), or shrunk
    as each run ends ("arena-shrink-each-run", as it was before)."""
    import onnxruntime

    import server

    class ArenaOff(server.PiperEngine):
        @staticmethod
        def session_options() -> Any:
            options = onnxruntime.SessionOptions()
            options.enable_cpu_mem_arena = False
            return options

        @staticmethod
        def session_runs(session: Any) -> Any:
            return session

        def idle(self) -> None:
            self.used.clear()

    class ArenaKept(ArenaOff):
        session_options = server.PiperEngine.session_options

    class ShrunkEachRun(server.ShrinkingSession):
        def run(self, output_names: Any, feeds: Any) -> Any:
            return self.session.run(output_names, feeds, self.shrinking)

    class ArenaShrunkEachRun(ArenaOff):
        session_options = server.PiperEngine.session_options

        @staticmethod
        def session_runs(session: Any) -> Any:
            return ShrunkEachRun(session)

    engines = {
        "arena-off": ArenaOff,
        "arena": ArenaKept,
        "arena-shrink-each-run": ArenaShrunkEachRun,
        "arena-shrink-when-idle": server.PiperEngine,
    }
    return engines[configuration]()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def synthesize_paragraph(engine: Any) -> float:
    """One call: the paragraph's audio seconds per wall second."""
    import server

    started = time.perf_counter()
    samples = sum(
        len(piece)
        for piece in engine.synthesize(PARAGRAPH, engine.default, server.SynthesisParams())
        if isinstance(piece, np.ndarray)
    )
    return samples / engine.sample_rate / (time.perf_counter() - started)


def loaded(configuration: str) -> Any:
    engine = engine_for(configuration)
    engine.load()
    engine.warm_up()
    return engine


def interleaved_speeds(configurations: list[str], calls: int) -> dict[str, list[float]]:
    engines = {configuration: loaded(configuration) for configuration in configurations}
    speeds: dict[str, list[float]] = {configuration: [] for configuration in configurations}
    for call in range(calls):
        order = configurations[call % len(configurations) :] + configurations[: call % len(configurations)]
        for configuration in order:
            speeds[configuration].append(synthesize_paragraph(engines[configuration]))
    return speeds


def rss_series(configuration: str, calls: int) -> list[float]:
    engine = loaded(configuration)
    series = []
    for _ in range(calls):
        synthesize_paragraph(engine)
        engine.idle()  # a lull after each call, as the server has one after a burst (ENGINE_REST_S)
        series.append(rss_mb())
    return series


def slope_per_100(values: list[float]) -> float:
    """Least-squares slope over the second half of the calls (the first ones fill caches), per 100 calls."""
    tail = values[len(values) // 2 :]
    if len(tail) < 2:
        return 0.0
    xs = range(len(tail))
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(tail)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, tail))
    return 100 * covariance / sum((x - mean_x) ** 2 for x in xs)


def child(*args: str) -> Any:
    """This tool's answer from a fresh process."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10, help="long calls per configuration, interleaved")
    parser.add_argument("--rss-calls", type=int, default=30, help="long calls in each configuration's own process")
    parser.add_argument("--configurations", default=",".join(CONFIGURATIONS))
    parser.add_argument("--speeds", action="store_true", help=argparse.SUPPRESS)  # a child: interleaved speeds
    parser.add_argument("--rss-of", help=argparse.SUPPRESS)  # a child: this configuration's RSS series
    args = parser.parse_args()
    configurations = args.configurations.split(",")
    if args.speeds:
        print(json.dumps(interleaved_speeds(configurations, args.calls)))
        return
    if args.rss_of:
        print(json.dumps(rss_series(args.rss_of, args.rss_calls)))
        return
    configs = ["--configurations", args.configurations]
    speeds = child("--speeds", "--calls", str(args.calls), *configs) if args.calls else {}
    rss = {c: child("--rss-of", c, "--rss-calls", str(args.rss_calls)) for c in configurations if args.rss_calls}
    print(
        "| configuration | audio s / wall s, median (min-max) | RSS after call 1 MB | RSS at end MB "
        "| RSS slope MB / 100 calls (second half) |"
    )
    print("|---|---|---|---|---|")
    for c in configurations:
        speed = (
            f"{statistics.median(speeds[c]):.2f} ({min(speeds[c]):.2f}-{max(speeds[c]):.2f})" if c in speeds else "-"
        )
        memory = f"{rss[c][0]:.0f} | {rss[c][-1]:.0f} | {slope_per_100(rss[c]):+.1f}" if c in rss else "- | - | -"
        print(f"| {c} | {speed} | {memory} |")
    if speeds:
        base = statistics.median(speeds[configurations[0]])
        ratios = ", ".join(f"{c} {statistics.median(speeds[c]) / base:.2f}x" for c in configurations[1:])
        print(f"\nthroughput against {configurations[0]}: {ratios}")


if __name__ == "__main__":
    main()
