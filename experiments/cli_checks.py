"""Checks of command-line values shared by the Hydra apps: each failure is one `ConfigError` line naming the
field and what is allowed, raised before any work starts or any file is written."""

from __future__ import annotations

import math
from typing import Any

from coel_env.errors import ConfigError


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
