"""Errors that reach users: always one line naming the bad field or value and what is allowed."""

from __future__ import annotations


class CoELError(ValueError):
    """Base class of CoEL-Gym's user-facing errors (a one-line message)."""


class ConfigError(CoELError):
    """A scenario, spec or hardware profile is malformed or unknown."""


class PlanError(CoELError):
    """A deployment plan or manifest is invalid for its scenario."""


def format_pydantic_error(source: str, exc) -> str:
    """Turn a pydantic ValidationError into one line: `source: field.path: message`."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    more = len(exc.errors()) - 1
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {loc or '<root>'}: {msg}{tail}"
