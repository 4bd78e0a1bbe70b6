"""Turning sweep fits into a HardwareProfile and writing it as `conf/hardware/<name>.yaml`."""

from __future__ import annotations

from pathlib import Path

import yaml

from coel_env.atomic import atomic_write_text
from coel_env.specs.hardware import CONF_DIR, HardwareProfile


def profile_dict(profile: HardwareProfile) -> dict:
    """Plain YAML-able dict of a profile (ints as dict keys kept, Nones dropped)."""
    data = profile.model_dump(exclude_none=True)
    data["device_overrides"] = {
        k: {f: v for f, v in o.items() if v is not None} for k, o in data.get("device_overrides", {}).items()
    }
    return data


def write_profile(profile: HardwareProfile, header: str, path: str | Path | None = None) -> Path:
    """Write `profile` to `path` (default conf/hardware/<name>.yaml) with a comment header; returns the path."""
    path = Path(path) if path else CONF_DIR / "hardware" / f"{profile.name}.yaml"
    text = "".join(f"# {ln}\n" for ln in header.splitlines())
    text += yaml.safe_dump(profile_dict(profile), sort_keys=False, default_flow_style=None, width=118)
    HardwareProfile(**yaml.safe_load(text))  # round-trip check before anything is written
    return atomic_write_text(path, text)
