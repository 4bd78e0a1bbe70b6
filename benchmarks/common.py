"""Shared timing and result-writing helpers of the benchmarks (every result file is written atomically)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from coel_env.atomic import atomic_write_json, atomic_write_text
from experiments.results_io import save_png, write_csv

__all__ = ["RESULTS", "machine", "median_rate", "save_png", "write_csv", "write_results"]

RESULTS = Path(__file__).resolve().parent / "results"


def median_rate(fn: Callable[[], object], items_per_call: int, repeats: int = 7, min_time: float = 0.2) -> dict:
    """Median (and spread) of items/second over `repeats` timed rounds of at least `min_time` each."""
    fn()  # warm-up (JIT compilation, caches)
    rates = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        rates.append(calls * items_per_call / elapsed)
    return {
        "median_per_s": statistics.median(rates),
        "min_per_s": min(rates),
        "max_per_s": max(rates),
        "repeats": repeats,
    }


def machine() -> dict:
    import os

    return {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_results(name: str, payload: dict, table: list[tuple], header: tuple, command: str) -> Path:
    """Write results/<name>.json and a Markdown table results/<name>.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "machine": machine(), **payload}
    atomic_write_json(RESULTS / f"{name}.json", payload, indent=2)
    lines = [
        f"# {name}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {payload['machine']}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table]
    return atomic_write_text(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
