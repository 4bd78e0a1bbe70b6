"""Checks of command-line values shared by the Hydra apps: each failure is one `ConfigError` line naming the
field and what is allowed, raised before any work starts or any file is written; and how an app exits on a
CoELError (`error_line`, `run_in_output_dir`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from coel_env.errors import ConfigError

T = TypeVar("T")


def require_int(value: Any, field: str, minimum: int | None = None) -> int:
    """`value` as an int (bools, floats and strings refused); at least `minimum` when given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{field}: {value!r} must be an integer" + (f" >= {minimum}" if minimum is not None else ""))
    if minimum is not None and value < minimum:
        raise ConfigError(f"{field}: {value} must be an integer >= {minimum}")
    return int(value)


def require_positive(value: Any, field: str) -> float:
    """`value` as a finite number > 0 (bools and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{field}: {value!r} must be a finite number > 0")
    return float(value)


def require_nonnegative(value: Any, field: str) -> float:
    """`value` as a finite number >= 0 (bools and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{field}: {value!r} must be a finite number >= 0")
    return float(value)


def require_int_in(value: Any, field: str, minimum: int, maximum: int) -> int:
    """`value` as an int in [minimum, maximum] (bools, floats and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(f"{field}: {value!r} must be an integer in [{minimum}, {maximum}]")
    return int(value)


def require_int_list(value: Any, field: str, minimum: int, maximum: int | None = None) -> list[int]:
    """`value` as a non-empty list of ints, each >= `minimum` (and <= `maximum` when given); names the bad item."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or hasattr(value, "keys"):
        raise ConfigError(f"{field}: {value!r} must be a list of integers >= {minimum}")
    items = list(value)
    if not items:
        raise ConfigError(f"{field}: must list at least one integer >= {minimum}")
    if maximum is None:
        return [require_int(v, f"{field}[{i}]", minimum) for i, v in enumerate(items)]
    return [require_int_in(v, f"{field}[{i}]", minimum, maximum) for i, v in enumerate(items)]


def optional_positive(value: Any, field: str) -> float | None:
    """None (the documented default), or `value` as a finite number > 0."""
    return None if value is None else require_positive(value, field)


def optional_seconds(value: Any, field: str, maximum: float | None = None) -> float | None:
    """None (the documented default), or `value` as a finite number of seconds in (0, maximum] (default:
    `coel_env.specs.bounds.MAX_SECONDS`, the cap of every duration in a spec)."""
    from coel_env.specs.bounds import MAX_SECONDS

    if value is None:
        return None
    seconds = require_positive(value, field)
    cap = MAX_SECONDS if maximum is None else maximum
    if seconds > cap:
        shown = int(cap) if float(cap).is_integer() else cap
        raise ConfigError(f"{field}: {value!r} must be a finite number in (0, {shown}] seconds")
    return seconds


def error_line(exc: BaseException, out=None) -> str:
    """The one line a CLI prints for a CoELError: `error: ` and the message's first line. A ServerError carries the
    failed server's traceback below that line: with `out` (the run's output folder) the whole message is written
    (atomically) to `out/error.txt` and the line says so."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    if len(lines) == 1 or out is None:
        return f"error: {lines[0]}"
    from pathlib import Path

    from coel_env.atomic import atomic_write_text

    try:
        path = atomic_write_text(Path(out) / "error.txt", str(exc).rstrip() + "\n")
    except OSError:
        return f"error: {lines[0]}"
    return f"error: {lines[0]} (details: {path})"


def run_in_output_dir(work: Callable[[Path], T]) -> tuple[T, Path]:
    """`work(out)` in a Hydra app, `out` being the run's output folder; (its result, out). A CoELError exits the
    app with its `error_line` (details in `out/error.txt`). In a joblib sweep worker the work runs under a standard
    multiprocessing start method (coel_env.mp_compat), so the processes it starts come up."""
    from hydra.core.hydra_config import HydraConfig

    from coel_env.errors import CoELError
    from coel_env.mp_compat import standard_start_method

    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        with standard_start_method():  # a joblib sweep job: the processes it starts need a standard start method
            return work(out), out
    except CoELError as exc:  # a ServerError of backend=real too: its first line (the server's traceback to a file)
        raise SystemExit(error_line(exc, out)) from None
