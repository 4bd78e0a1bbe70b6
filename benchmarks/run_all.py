"""Run every benchmark module (benchmarks/bench_*.py) in turn: `make bench`."""

from __future__ import annotations

import importlib
import pkgutil

import benchmarks


def main() -> None:
    for info in pkgutil.iter_modules(benchmarks.__path__):
        if info.name.startswith("bench_") and info.name != "bench_real_gpu":
            print(f"== {info.name}")
            importlib.import_module(f"benchmarks.{info.name}").main()


if __name__ == "__main__":
    main()
