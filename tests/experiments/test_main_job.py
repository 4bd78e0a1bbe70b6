"""`make run`'s job end to end with a tiny budget: train → evaluate → export → comparison report; its W&B runs
(offline: one group, job types, artifacts, syncable), its log output (status lines, the headline at the end, no
third-party noise) and the self-contained HTML report rendered in a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agents.tracking import read_offline_run

ROOT = Path(__file__).resolve().parents[2]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
# banners and notes of libraries, never our own lines
NOISE = ("wandb:", "Weave", "torchvision is not installed", "onnx_ir", "onnxscript", "LeafSpec")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cmd = [
        sys.executable,
        "-m",
        "experiments.main",
        "experiment=smoke",
        "scenario=tiny",
        "seeds=1",
        "eval_epochs=4",
        "policies=[static_linear,eplb]",
        "eval_overrides=['tuning.trials=2','tuning.instances=1','tuning.epochs=2']",
        f"hydra.run.dir={root}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") or k == "WANDB_MODE"}
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**env, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def test_main_job_smoke(job):
    tmp_path, proc = job
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert f"Everything is under {tmp_path}" in proc.stdout
    assert (Path(summary["policy"]) / "actor.onnx").is_file()
    board = Path(summary["leaderboard"]).read_text()
    assert "agent:train" in board and "eplb" in board and "static_linear" in board
    report = Path(summary["report"]).read_text()
    assert "agent:train vs the best baseline" in report and "test instances" in report  # the headline
    for section in ("## Training runs", "## Learning curves", "## Leaderboard", "## Pareto fronts", "## Placements"):
        assert section in report
    compare = tmp_path / "compare"
    assert {
        "learning_curves.png",
        "pareto_latency_quality.png",
        "pareto_latency_energy.png",
        "placement_tiny_eplb.png",
        "report.html",
        "report.json",
    } <= {p.name for p in compare.iterdir()}
    assert "<table>" in (compare / "report.html").read_text()


def test_main_job_prints_status_lines_and_the_headline_without_third_party_noise(job):
    tmp_path, proc = job
    out = proc.stdout + proc.stderr
    # stdout is a pipe, not a TTY: status lines instead of a silent progress bar
    assert re.search(r"^\[train\] 512/512 steps \(100%\) \| \d+ fps \|.* \| eval @ 512: agent score ", out, re.M)
    summary = json.loads((tmp_path / "summary.json").read_text())
    headline = summary["headline"]
    assert len(headline) == 1 and headline[0].startswith("tiny: agent:train vs the best baseline ")
    assert "**" not in headline[0] and "`" not in headline[0]
    tail = proc.stdout[proc.stdout.index("Done in ") :]
    assert f"Result: {headline[0]}" in tail  # the headline at the very end, next to the paths
    noisy = [ln for ln in out.splitlines() if any(n in ln for n in NOISE)]
    assert not noisy, noisy[:5]


def test_main_job_wandb_runs_share_a_group_with_job_types_and_artifacts(job):
    tmp_path, proc = job
    summary = json.loads((tmp_path / "summary.json").read_text())
    dirs = [Path(d) for d in summary["wandb_offline_runs"]]
    assert [d.parents[1].name for d in dirs] == ["train", "evaluate", "compare"] and all(d.is_dir() for d in dirs)
    runs = [read_offline_run(d) for d in dirs]
    group = summary["wandb_group"]
    assert group.startswith("ppo-tiny-") and {r["group"] for r in runs} == {group}
    assert [r["job_type"] for r in runs] == ["train", "evaluate", "compare"]
    arts = {a["type"]: a for r in runs for a in r["artifacts"] if a["type"] != "run_table"}
    assert set(arts) == {"model", "policy", "leaderboard", "report"}
    assert {"model.zip", "env_spec.json", "train_summary.json"} <= set(arts["model"]["files"])
    assert "policy/actor.onnx" in arts["policy"]["files"]
    assert {"leaderboard.csv", "leaderboard.md", "episodes.csv"} <= set(arts["leaderboard"]["files"])
    assert {"report.md", "report.html", "learning_curves.png"} <= set(arts["report"]["files"])
    assert all(group in a["aliases"] and "latest" in a["aliases"] for a in arts.values())
    history = runs[0]["history"]
    # the smoke preset evaluates at 256 and 512 steps: the baseline is a line (a value at every evaluation step)
    assert history["eval/static_score_raw"] == history["eval/agent_score_raw"] >= 2
    assert "eval/learning_curve_table/_type" in history  # one chart: agent and baselines against env steps
    # syncable: printed as one command, and wandb's own tool finds the three runs
    assert "wandb sync " + " ".join(map(str, dirs)) in proc.stdout
    sync = subprocess.run(
        [sys.executable, "-m", "wandb", "sync", "--dry-run", *map(str, dirs)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert "Would sync 3 run(s)" in sync.stdout + sync.stderr, (sync.stdout + sync.stderr)[-2000:]


def _browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def test_report_html_is_self_contained_in_a_headless_browser(job, tmp_path):
    """The report opens alone: copied into a folder without its PNGs, every image still loads in a real browser."""
    browser = _browser()
    if browser is None:
        pytest.skip(
            f"no headless browser on PATH ({', '.join(BROWSERS)}); .ci/run installs Debian's chromium with apt-get"
        )
    page = (job[0] / "compare" / "report.html").read_text()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(srcs) >= 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    text = re.sub(r"<[^>]+>", "", page.split("<body>", 1)[1])
    assert "`" not in text and "**" not in text  # inline code and bold are rendered, not left as markdown
    # the headline names the best baseline as inline code (which one wins depends on the physics, not on the report)
    assert re.search(r"<b>tiny: agent:train vs the best baseline <code>[\w:.-]+</code>", page)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "report.html").write_text(page)
    probe = (
        "<script>window.addEventListener('load',function(){var r=[];for(var i of document.images)"
        "{r.push(i.complete&&i.naturalWidth>0?'ok':'broken')}document.body.setAttribute('data-images',r.join(','))"
        "})</script>"
    )
    (alone / "probe.html").write_text(page.replace("</body>", probe + "</body>"))
    assert sorted(p.name for p in alone.iterdir()) == ["probe.html", "report.html"]  # no PNG next to them
    flags = ["--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [browser, *flags, "--virtual-time-budget=10000", "--dump-dom", (alone / "probe.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    loaded = re.search(r'data-images="([^"]*)"', dom.stdout)
    assert loaded, dom.stderr[-2000:]
    assert loaded.group(1).split(",") == ["ok"] * len(srcs)  # every image decoded (naturalWidth > 0)
    shot = tmp_path / "shot.png"
    screenshot = [*flags, "--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}"]
    proc = subprocess.run([browser, *screenshot, (alone / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (1600, 1200)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 50 and pixels.std() > 10  # text, tables and a plot: not a blank page


def test_compare_rejects_a_non_run_directory(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "experiments.compare",
        f"runs=[{tmp_path}]",
        f"hydra.run.dir={tmp_path / 'out'}",
        "logger=disabled",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"error: runs: '{tmp_path}' is not a training run directory (no progress.csv)"
    )
