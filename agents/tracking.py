"""Experiment tracking: Weights & Biases runs (offline by default); SB3's logger that forwards to W&B is
`agents.sb3_logger` (this module needs neither SB3 nor, until a run starts, wandb: evaluation machines lack them).

The way CleanRL / SB3 users expect it: every app starts its run with `init_wandb` (job type `train`, `evaluate` or
`compare`; one `group` per `make run` or per sweep), logs its outputs as artifacts (`log_artifact`: the model, the
deployment policy, the leaderboard, the report) and prints, for an offline run, the `wandb sync` command that
uploads it (`finish_wandb`). W&B's own banners are silenced (`WANDB_SILENT`, no Weave hints); our lines stay.
`read_offline_run` reads an offline run's records back (tests, inspection without an account)."""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

WANDB_MODES = ("offline", "online", "disabled")
QUIET_ENV = {"WANDB_SILENT": "true", "WANDB_DISABLE_WEAVE": "true", "WANDB_CONSOLE": "off"}


def wandb_mode(logger_cfg: dict) -> str:
    """The run's mode: `disabled` when the config or WANDB_MODE says so, else WANDB_MODE, else the config's."""
    cfg_mode = logger_cfg.get("mode", "offline")
    env_mode = os.environ.get("WANDB_MODE")
    mode = "disabled" if "disabled" in (cfg_mode, env_mode) else (env_mode or cfg_mode)
    if mode not in WANDB_MODES:
        from coel_env.errors import ConfigError

        raise ConfigError(f"logger.mode: '{mode}' unknown; allowed: {', '.join(WANDB_MODES)}")
    return mode


def quiet_wandb() -> None:
    """No W&B banners or hints in our logs (set unless the user set them)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def init_wandb(
    logger_cfg: dict,
    out_dir: str | Path,
    config: dict,
    name: str,
    job_type: str = "train",
    step_metric: str | None = None,
):
    """Start a W&B run in `out_dir` (mode: `wandb_mode`); None when W&B is disabled. `logger_cfg.group` groups the
    runs of one `make run` / sweep (WANDB_RUN_GROUP when it is null); `step_metric` (training: `global_step`, the
    environment steps, CleanRL's x axis) is every chart's x."""
    mode = wandb_mode(logger_cfg)
    if mode == "disabled":
        return None
    quiet_wandb()
    import wandb

    run = wandb.init(
        project=logger_cfg.get("project", "coel-gym"),
        entity=logger_cfg.get("entity"),
        group=logger_cfg.get("group") or os.environ.get("WANDB_RUN_GROUP") or None,
        tags=list(logger_cfg.get("tags") or []),
        name=name,
        job_type=job_type,
        dir=str(out_dir),
        mode=mode,
        config=config,
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off"),
    )
    if step_metric:
        run.define_metric(step_metric)
        run.define_metric("*", step_metric=step_metric)
    return run


def artifact_name(*parts: Any) -> str:
    """A valid W&B artifact name from `parts` (letters, digits, '-', '_', '.')."""
    raw = "-".join(str(p) for p in parts if p not in (None, ""))
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)[:128]


def log_artifact(run, name: str, kind: str, paths: list[str | Path], metadata: dict | None = None, aliases=()):
    """Log the existing files / folders in `paths` as one artifact of type `kind`; None without a run or files."""
    if run is None:
        return None
    import wandb

    art = wandb.Artifact(artifact_name(name), type=kind, metadata=metadata or {})
    added = 0
    for p in map(Path, paths):
        if p.is_dir():
            art.add_dir(str(p), name=p.name)
            added += 1
        elif p.is_file():
            art.add_file(str(p), name=p.name)
            added += 1
    if not added:
        return None
    group = getattr(run, "group", None)
    return run.log_artifact(art, aliases=["latest", *aliases, *([artifact_name(group)] if group else [])])


def use_artifact(run, name: str) -> None:
    """Record `name:latest` as an input of `run` (W&B lineage); online only (W&B has no offline use_artifact)."""
    if run is None or run.settings.mode != "online":
        return
    with contextlib.suppress(Exception):  # not logged (yet) in this project: lineage is a nicety, never a failure
        run.use_artifact(f"{artifact_name(name)}:latest")


def sync_dir(run) -> Path | None:
    """The offline run's directory (what `wandb sync` takes), None for an online or no run."""
    if run is None or run.settings.mode != "offline":
        return None
    return Path(run.settings.sync_dir)


def finish_wandb(run, out=sys.stdout) -> Path | None:
    """Finish `run`; for an offline run print the one line that uploads it and return its directory."""
    if run is None:
        return None
    path = sync_dir(run)
    run.finish()
    if path is not None:
        group = f" (group {run.group})" if run.group else ""
        print(f"W&B offline run{group}: wandb sync {path}", file=out, flush=True)
    return path


_BLOCK = 32768  # the run file is a LevelDB-style log: 32 KiB blocks of records with a 7-byte header each


def _records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # full / first, then middle / last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def _finished_records(path: Path, wait_s: float) -> list:
    """The records of a run file once its `exit` record is there: W&B's service may still be writing when
    `run.finish()` returns, so poll for up to `wait_s` seconds (then return what is there)."""
    deadline = time.monotonic() + wait_s
    while True:
        records = list(_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def read_offline_run(run_dir: str | Path, wait_s: float = 30.0) -> dict:
    """An offline run directory (`wandb/offline-run-*`) read back without W&B's servers, once the run's last record
    is written (at most `wait_s` seconds): its id, name, group, job type, config keys, `history` ({key: number of
    logged steps holding it}), summary keys and artifacts ({name, type, aliases, files})."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir} has no run-*.wandb file")
    out: dict[str, Any] = {"artifacts": [], "history": {}, "summary_keys": set(), "config_keys": set()}
    for rec in _finished_records(files[0], wait_s):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(id=r.run_id, name=r.display_name, group=r.run_group, job_type=r.job_type, project=r.project)
            out["config_keys"] |= {i.key for i in r.config.update}
        elif kind == "config":
            out["config_keys"] |= {i.key for i in rec.config.update}
        elif kind == "history":  # key -> how many logged steps hold it
            for key in {i.key or "/".join(i.nested_key) for i in rec.history.item}:
                out["history"][key] = out["history"].get(key, 0) + 1
        elif kind == "summary":
            out["summary_keys"] |= {i.key or "/".join(i.nested_key) for i in rec.summary.update}
        elif kind == "artifact":
            a = rec.artifact
            files_ = sorted(m.path for m in a.manifest.contents)
            out["artifacts"].append({"name": a.name, "type": a.type, "aliases": list(a.aliases), "files": files_})
    return out
