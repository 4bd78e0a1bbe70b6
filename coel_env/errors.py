"""Errors that reach users: always one line naming the bad field or value and what is allowed."""

from __future__ import annotations

import types
import typing


class CoELError(ValueError):
    """Base class of CoEL-Gym's user-facing errors (a one-line message)."""


class ConfigError(CoELError):
    """A scenario, spec or hardware profile is malformed or unknown."""


class PlanError(CoELError):
    """A deployment plan or manifest is invalid for its scenario."""


class ActionError(CoELError):
    """An action does not fit its action space (shape, dtype, NaN/inf, out of range); nothing was applied."""


def _field_names(model, loc: tuple) -> list[str]:
    """Field names of the pydantic model found by walking `loc` from `model` (empty if it cannot be followed)."""
    cur = model
    for part in loc:
        while typing.get_origin(cur) in (list, tuple, typing.Union, types.UnionType, dict):
            args = [a for a in typing.get_args(cur) if a is not type(None) and a is not Ellipsis]
            models = [a for a in args if hasattr(a, "model_fields") or typing.get_origin(a)]
            cur = (models or args or [None])[-1]
        if isinstance(part, int):
            continue
        fields = getattr(cur, "model_fields", None)
        if fields is None or part not in fields:
            return []
        cur = fields[part].annotation
    while typing.get_origin(cur) in (list, tuple, typing.Union, types.UnionType):
        args = [a for a in typing.get_args(cur) if hasattr(a, "model_fields")]
        cur = args[-1] if args else None
    return list(getattr(cur, "model_fields", {}))


def format_pydantic_error(source: str, exc, model=None) -> str:
    """Turn a pydantic ValidationError into one line: `source: field.path: message`.

    With `model` (the validated pydantic class), an unknown field also lists the allowed field names."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid value")).splitlines()[0] if err.get("msg") else "invalid value"
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
        allowed = _field_names(model, tuple(err.get("loc", ()))[:-1]) if model is not None else []
        if allowed:
            msg += f"; allowed: {', '.join(allowed)}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if loc and msg.startswith(f"{loc}: "):  # a nested one-line error already naming the field
        msg = msg[len(loc) + 2 :]
    more = len(exc.errors()) - 1
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {loc + ': ' if loc else ''}{msg}{tail}"


def read_json_object(path, label: str, error: type[CoELError] = ConfigError) -> dict:
    """The JSON object in file `path`; `error` (one line, prefixed by `label`) if it is missing, not JSON or not an
    object — the one way user-supplied JSON files (manifests, HF configs, policy metadata) are read."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise error(f"{label}: no file '{p}'")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" ({exc.msg} at line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise error(f"{label}: '{p}' is not valid JSON{where}") from None
    if not isinstance(data, dict):
        raise error(f"{label}: '{p}' must hold a JSON object")
    return data
