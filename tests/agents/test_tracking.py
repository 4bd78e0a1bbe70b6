"""agents.tracking (W&B mode, artifact names, offline run files), the training status line and the quiet export."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from agents.export import quiet_onnx_export
from agents.sb3 import StatusLineCallback
from agents.tracking import artifact_name, finish_wandb, init_wandb, log_artifact, read_offline_run, wandb_mode
from coel_env.errors import ConfigError


@pytest.mark.parametrize(
    "env, cfg, expected",
    [
        (None, "offline", "offline"),
        ("offline", "online", "offline"),  # WANDB_MODE wins over the config ...
        ("offline", "disabled", "disabled"),  # ... except that `logger=disabled` always means no W&B
        ("disabled", "online", "disabled"),
    ],
)
def test_wandb_mode(monkeypatch, env, cfg, expected):
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert wandb_mode({"mode": cfg}) == expected


def test_unknown_wandb_mode_is_one_line(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match=r"logger\.mode: 'sometimes' unknown; allowed: offline, online, disabled"):
        wandb_mode({})


def test_artifact_names_are_valid():
    assert artifact_name("model", "PPO", "paper testbed/1", None, "s0") == "model-PPO-paper_testbed_1-s0"


def test_offline_run_records_group_job_type_and_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "model.zip").write_bytes(b"weights")
    run = init_wandb({"mode": "offline", "group": "g-1"}, tmp_path, {"seed": 3}, "PPO-tiny-s3", job_type="train")
    run.log({"eval/agent_score_raw": 0.5, "global_step": 10}, step=10)
    run.log({"eval/agent_score_raw": 0.6, "global_step": 20}, step=20)
    log_artifact(run, "model-PPO-tiny-s3", "model", [tmp_path / "model.zip", tmp_path / "absent.json"], {"seed": 3})
    out = io.StringIO()
    path = finish_wandb(run, out=out)
    assert out.getvalue() == f"W&B offline run (group g-1): wandb sync {path}\n"
    rec = read_offline_run(path)
    assert (rec["name"], rec["group"], rec["job_type"]) == ("PPO-tiny-s3", "g-1", "train")
    assert "seed" in rec["config_keys"] and rec["history"]["eval/agent_score_raw"] == 2
    (art,) = rec["artifacts"]  # the missing file is left out, the rest logged
    assert (art["name"], art["type"], art["files"], sorted(art["aliases"])) == (
        "model-PPO-tiny-s3",
        "model",
        ["model.zip"],
        ["g-1", "latest"],
    )


def test_disabled_wandb_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert init_wandb({"mode": "disabled"}, tmp_path, {}, "x") is None
    assert finish_wandb(None) is None and not (tmp_path / "wandb").exists()


def test_status_line_shows_steps_fps_eta_and_the_latest_evaluation():
    row = {"timesteps": 400, "agent": {"score_raw": 0.81234}, "best_baseline_score_raw": 0.8}
    cb = StatusLineCallback(1000, every_s=30, latest=lambda: row, out=io.StringIO())
    cb._start, cb._start_steps, cb.num_timesteps = 100.0, 0, 500
    assert cb.line(110.0) == (
        "[train] 500/1000 steps (50%) | 50 fps | 10 s elapsed, ETA 10 s | eval @ 400: agent score 0.8123, "
        "best baseline 0.8000"
    )
    cb.emit(110.0)
    assert cb.out.getvalue().count("\n") == 1 and cb.lines == [cb.line(110.0)]


def test_quiet_onnx_export_silences_only_third_party_noise():
    logging.getLogger("onnx_ir").setLevel(logging.NOTSET)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_onnx_export():
            assert not logging.getLogger("onnx_ir").isEnabledFor(logging.INFO)
            assert not logging.getLogger("torch.onnx._internal.exporter._registration").isEnabledFor(logging.WARNING)
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("ours", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["ours"]
    assert logging.getLogger("onnx_ir").level == logging.NOTSET  # restored


def test_evaluation_with_logging_disabled_needs_neither_sb3_nor_wandb(tmp_path):
    """experiments.evaluate's W&B step on a machine without SB3 and wandb (a GPU box running exported policies):
    with logger.mode disabled it is a no-op, and importing the tracking module pulls in neither."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    code = textwrap.dedent(f"""
        import sys
        sys.modules["stable_baselines3"] = None  # an import of either now fails
        sys.modules["wandb"] = None
        from pathlib import Path
        from omegaconf import OmegaConf
        from experiments.evaluate import log_wandb
        log_wandb(OmegaConf.create({{"logger": {{"mode": "disabled"}}, "policies": []}}), Path({str(tmp_path)!r}), [])
        print("ok")
    """)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
