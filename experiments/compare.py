"""Comparison report (Hydra app): trained agents and baselines side by side.

    python -m experiments.compare runs=[outputs/train/paper-testbed/...] leaderboard=outputs/evaluate/...

Writes `report.md`, `report.html` (self-contained: the images are embedded as data URIs, so the page opens alone)
and `report.json` (the headline) with PNGs into the output dir — learning curves (agent vs baselines during
training), the leaderboard, latency-vs-quality and energy-vs-latency Pareto plots, placement heatmaps — and logs the
tables, images and a `report` artifact to W&B (job type `compare`, offline by default). With W&B online and
`wandb-workspaces` installed it also builds a W&B Report.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import re
from pathlib import Path

import hydra
import matplotlib
import numpy as np
from omegaconf import DictConfig, OmegaConf

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from coel_env.atomic import atomic_write_json, atomic_write_text
from coel_env.errors import ConfigError
from coel_env.specs import load_scenario_spec
from experiments.cli_checks import require_int, run_in_output_dir
from experiments.results_io import save_image, save_png

log = logging.getLogger(__name__)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _float(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _curve_rows(run: Path) -> tuple[list[float], list[float], list[float], list[float], dict]:
    """(timesteps, agent raw score, its lower and upper bootstrap bounds, {baseline: (score, lo, hi)}) of a run's
    evaluations: train_summary.json's history, else progress.csv's eval rows (x = eval/timesteps)."""
    summary = run / "train_summary.json"
    if summary.is_file():
        hist = json.loads(summary.read_text()).get("evaluations") or []
        hist = [h for h in hist if "score_raw" in h.get("agent", {})]
        if hist:
            xs = [float(h["timesteps"]) for h in hist]
            ys = [float(h["agent"]["score_raw"]) for h in hist]
            lo = [float(h["agent"].get("score_raw_lo", np.nan)) for h in hist]
            hi = [float(h["agent"].get("score_raw_hi", np.nan)) for h in hist]
            base = {n: (b["score_raw"], b["score_raw_lo"], b["score_raw_hi"]) for n, b in hist[0]["baselines"].items()}
            return xs, ys, lo, hi, base
    rows = [r for r in read_csv(run / "progress.csv") if r.get("eval/agent_score_raw")]
    xs = [_float(r.get("eval/timesteps") or r.get("time/total_timesteps")) for r in rows]
    keep = [k for k, x in enumerate(xs) if np.isfinite(x)]
    rows, xs = [rows[k] for k in keep], [xs[k] for k in keep]
    ys = [_float(r["eval/agent_score_raw"]) for r in rows]
    lo = [_float(r.get("eval/agent_score_raw_lo")) for r in rows]
    hi = [_float(r.get("eval/agent_score_raw_hi")) for r in rows]
    base = {}
    for r in read_csv(run / "progress.csv"):
        for k in r:
            if (
                k.startswith("eval/")
                and k.endswith("_score_raw")
                and r[k]
                and not k.startswith(("eval/agent", "eval/best"))
            ):
                n = k[5 : -len("_score_raw")]
                base.setdefault(
                    n, (_float(r[k]), _float(r.get(f"eval/{n}_score_raw_lo")), _float(r.get(f"eval/{n}_score_raw_hi")))
                )
    return xs, ys, lo, hi, base


def learning_curves(runs: list[Path], out: Path) -> Path | None:
    """The official raw score of the deterministic agent on validation instances against environment steps, one
    line (with its bootstrap band) per training run; the baselines on the same instances as horizontal bands."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    plotted = False
    for i, run in enumerate(runs):
        xs, ys, lo, hi, base = _curve_rows(run)
        if not xs:
            continue
        ax.plot(xs, ys, marker="o", label=f"agent ({run.name})", color=f"C{i}")
        ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.2)
        plotted = True
        if i == 0:
            for j, (name, (m, blo, bhi)) in enumerate(sorted(base.items())):
                color = f"C{j + len(runs)}"
                ax.axhline(m, ls="--", color=color, label=name)
                ax.axhspan(blo, bhi, color=color, alpha=0.12)
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("environment steps")
    ax.set_ylabel("official score (raw, validation instances)")
    ax.set_title("Learning curves (bands: 95% bootstrap)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out / "learning_curves.png"
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


def headline(rows: list[dict], summaries: list[dict]) -> list[str]:
    """One sentence per (scenario, agent): the agent against the best baseline on the official score."""
    out = []
    trained_on = sorted({str(s.get("reward_space")) for s in summaries if s.get("reward_space")})
    for r in rows:
        if r.get("kind") != "agent":
            continue
        d, lo, hi = _float(r.get("delta")), _float(r.get("delta_lo")), _float(r.get("delta_hi"))
        verdict = {"tie": "a tie (the interval holds 0)", "better": "better", "worse": "worse"}.get(
            r.get("verdict", ""), r.get("verdict", "")
        )
        out.append(
            f"**{r['scenario']}: {r['policy']} vs the best baseline `{r['best_baseline']}`: "
            f"Δscore = {d:+.3f} [95% CI {lo:+.3f}, {hi:+.3f}], {verdict}; P(agent > baseline) = "
            f"{_float(r.get('p_improve')):.2f} [{_float(r.get('p_improve_lo')):.2f}, "
            f"{_float(r.get('p_improve_hi')):.2f}]; {r['episodes']} test instances; score = "
            f"`{r.get('score_version', '?')}` (normalized: 0 = static_linear, 1 = best tuned heuristic)"
            + (f"; the agent trained on reward `{', '.join(trained_on)}`" if trained_on else "")
            + ".**"
        )
    if not out and rows:
        best = next((r for r in rows if r.get("kind") in ("baseline", "reference")), None)
        if best is not None:
            out.append(f"No trained agent on the leaderboard; best baseline `{best['policy']}` ({best['scenario']}).")
    return out


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Points not dominated when both coordinates are to be minimised."""
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        dominated = (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        keep[i] = not dominated.any()
    return keep


def pareto_plot(rows: list[dict], xkey: str, ykey: str, xlabel: str, ylabel: str, path: Path) -> Path:
    scenarios = sorted({r["scenario"] for r in rows})
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5.2 * len(scenarios), 4.2), squeeze=False)
    for ax, sc in zip(axes[0], scenarios):
        sub = [r for r in rows if r["scenario"] == sc]
        x = np.array([_float(r[xkey]) for r in sub])
        y = np.array([_float(r[ykey]) for r in sub])
        front = pareto_mask(x, y)
        for r, xi, yi, f in zip(sub, x, y, front):
            ax.scatter(xi, yi, s=60 if f else 25, edgecolor="k" if f else "none")
            ax.annotate(r["policy"], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        order = np.argsort(x[front])
        ax.plot(x[front][order], y[front][order], "k--", lw=0.8, label="Pareto front")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(sc)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


def placement_heatmaps(
    scenario: str, policies: list[str], epochs: int, seed: int, out: Path, skipped: list[dict] | None = None
) -> list[Path]:
    """Render (rgb_array) the deployment each policy holds after `epochs` decision epochs. An exported policy that
    does not fit `scenario` (trained on another one) is skipped with one warning line (and appended to `skipped`)."""
    import gymnasium as gym

    import coel_env  # noqa: F401
    from agents.baselines import make_policy
    from agents.deployed import DeployedAgent
    from agents.rollout import run_episode

    paths = []
    for name in policies:
        policy = DeployedAgent(name) if Path(name).is_dir() else make_policy(name, seed=seed)
        kwargs = {"scenario": scenario, "max_epochs": epochs, "render_mode": "rgb_array"}
        if isinstance(policy, DeployedAgent):
            kwargs["action_space"] = policy.env_kwargs.get("action_space", "full")
        env = gym.make("CoEL-v0", **kwargs)
        reason = policy.incompatibility(env) if isinstance(policy, DeployedAgent) else None
        if reason is not None:
            env.close()
            log.warning("skipping policy %s (%s) on scenario %s: %s", policy.name, name, scenario, reason)
            if skipped is not None:
                skipped.append({"scenario": scenario, "policy": policy.name, "directory": name, "reason": reason})
            continue
        run_episode(env, policy, seed)
        frame = env.render()
        env.close()
        label = policy.name.replace(":", "_").replace("/", "_")
        path = out / f"placement_{scenario}_{label}.png"
        save_image(frame, path)
        paths.append(path)
    return paths


def _ci(r: dict, key: str, scale: float = 1.0) -> str:
    x, lo, hi = (_float(r.get(k)) * scale for k in (key, f"{key}_lo", f"{key}_hi"))
    x, lo, hi = (0.0 if abs(v) < 1e-9 else v for v in (x, lo, hi))  # rounding noise of a reference's own 0
    return "n/a" if not np.isfinite(x) else f"{x:.4g} [{lo:.4g}, {hi:.4g}]"


def leaderboard_markdown(rows: list[dict]) -> str:
    """The leaderboard's rows per scenario in its own order (ranked on the official score; ties share a rank)."""
    lines = []
    head = ("rank", "policy", "score", "IQM", "Δ vs best baseline", "P(>best)", "p95 latency (s)", "SLO (%)")
    head += ("quality loss (%)", "over budget (% epochs)", "return (training reward)")
    for sc in dict.fromkeys(r["scenario"] for r in rows):
        lines += [f"### {sc}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in (r for r in rows if r["scenario"] == sc):
            kind = {"bound": " (bound)", "reference": " (ref)", "agent": " (agent)"}.get(r.get("kind", ""), "")
            v = r.get("verdict", "")
            delta = (
                v
                if v in ("best baseline", "")
                else (f"{_float(r['delta']):+.3f} [{_float(r['delta_lo']):+.3f}, {_float(r['delta_hi']):+.3f}] {v}")
            )
            cells = [
                r.get("rank", ""),
                r["policy"] + kind,
                _ci(r, "score"),
                _ci(r, "iqm"),
                delta,
                _ci(r, "p_improve"),
                _ci(r, "e2e_p95_s"),
                _ci(r, "slo_attainment", 100),
                _ci(r, "quality_loss", 100),
                _ci(r, "infeasible", 100),
                _ci(r, "return"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<![\w*])\*(?!\s)([^*]+?)(?<!\s)\*(?![\w*])")


def inline_html(text: str) -> str:
    """One line of the report's markdown as HTML: escaped, `code` as <code>, **bold** as <b> (also around code
    spans), *italic* as <i>; nothing inside a code span is touched."""
    codes: list[str] = []

    def stash(m: re.Match) -> str:
        codes.append(f"<code>{html.escape(m.group(1))}</code>")
        return f"\ue000{len(codes) - 1}\ue001"

    out = _ITALIC.sub(r"<i>\1</i>", _BOLD.sub(r"<b>\1</b>", html.escape(_CODE.sub(stash, text))))
    return re.sub("\ue000(\\d+)\ue001", lambda m: codes[int(m.group(1))], out)


def plain_text(text: str) -> str:
    """A markdown line as plain text (no **, no backticks): for logs and summaries."""
    return _BOLD.sub(r"\1", _CODE.sub(r"\1", text)).strip()


def image_src(src: str, base_dir: Path | None) -> str:
    """`src` as a data: URI when it is a file next to the report (the page then needs no other file)."""
    path = (base_dir / src) if base_dir is not None else Path(src)
    if not path.is_file():
        log.warning("report.html: image '%s' not found; left as a link", src)
        return src
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
    kind = mime.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def markdown_to_html(md: str, title: str, base_dir: Path | None = None) -> str:
    """A self-contained HTML page of the report: headings, tables, lists, paragraphs with inline code, and the
    images (files in `base_dir`) embedded as base64 data URIs — it opens anywhere, alone."""
    body, table, items = [], [], []

    def flush() -> None:
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
            cells = [[inline_html(c.strip()) for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            table.clear()
        if items:
            body.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            body.append(f"<h{level}>{inline_html(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            src = image_src(src.rstrip(")"), base_dir)
            body.append(f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">')
        elif line.strip():
            body.append(f"<p>{inline_html(line)}</p>")
    flush()
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%;display:block;margin:1em 0}"
        "code{background:#f3f3f3;padding:0 3px;border-radius:3px;font-size:90%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )


def check(cfg: DictConfig) -> None:
    """Refuse bad command-line values in one line, before anything is rendered or written."""
    require_int(cfg.heatmaps.epochs, "heatmaps.epochs", 1)
    require_int(cfg.heatmaps.seed, "heatmaps.seed", 0)
    if cfg.heatmaps.scenario:
        load_scenario_spec(str(cfg.heatmaps.scenario))


def build_report(cfg: DictConfig, out: Path) -> dict:
    check(cfg)
    runs = [Path(r) for r in cfg.runs]
    for r in runs:
        if not (r / "progress.csv").is_file():
            raise ConfigError(f"runs: '{r}' is not a training run directory (no progress.csv)")
    board_dir = Path(cfg.leaderboard) if cfg.leaderboard else None
    if board_dir is not None and not (board_dir / "leaderboard.csv").is_file():
        raise ConfigError(f"leaderboard: '{board_dir}' has no leaderboard.csv (run experiments.evaluate first)")
    md = ["# CoEL-Gym comparison report", ""]
    images: dict[str, Path] = {}
    summaries = [
        json.loads((r / "train_summary.json").read_text()) for r in runs if (r / "train_summary.json").is_file()
    ]
    rows: list[dict] = read_csv(board_dir / "leaderboard.csv") if board_dir is not None else []
    head = headline(rows, summaries)
    if head:
        md += [*head, ""]
    if summaries:
        md += [
            "## Training runs",
            "",
            "| run | algorithm | scenario | seed | steps | reward | wall (s) | first beat all baselines (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r, s in zip(runs, summaries):
            first = f"{s['first_win_s']:.0f}" if s.get("first_win_s") is not None else "not within the run"
            md.append(
                f"| {r.name} | {s['algo']} | {s['scenario']} | {s['seed']} | {s['timesteps']} | "
                f"{s.get('reward_space', '?')} | {s['train_time_s']:.0f} | {first} |"
            )
        md.append("")
    curve = learning_curves(runs, out) if runs else None
    if curve:
        images["learning_curves"] = curve
        md += [
            "## Learning curves",
            "",
            "The official raw score (coel_env/benchmark/score.py) of the deterministic agent on validation "
            "instances during training, against environment steps; dashed lines and bands: the baselines on the "
            "same instances (95% bootstrap).",
            "",
            f"![learning curves]({curve.name})",
            "",
        ]
    if board_dir is not None:
        md += [
            "## Leaderboard",
            "",
            f"From `{board_dir}`: test instances only, ranked on the official score (normalized per scenario: "
            "0 = static_linear, 1 = the best tuned heuristic); mean [95% bootstrap]; Δ: paired difference to the "
            "best baseline [Student-t 95%], *tie* when it holds 0 (ties share a rank); bounds are not ranked.",
            "",
            leaderboard_markdown(rows),
        ]
        skipped_file = board_dir / "skipped.json"
        for k in json.loads(skipped_file.read_text()) if skipped_file.is_file() else []:
            md += [f"Not evaluated: `{k['policy']}` on `{k['scenario']}` ({k['reason']}).", ""]
        p1 = pareto_plot(
            rows, "e2e_p95_s", "quality_loss", "p95 latency (s)", "quality loss", out / "pareto_latency_quality.png"
        )
        p2 = pareto_plot(
            rows, "e2e_p95_s", "energy_j", "p95 latency (s)", "energy per epoch (J)", out / "pareto_latency_energy.png"
        )
        images.update(pareto_latency_quality=p1, pareto_latency_energy=p2)
        md += ["## Pareto fronts", "", f"![latency vs quality]({p1.name})", "", f"![latency vs energy]({p2.name})", ""]
    if cfg.heatmaps.scenario:
        policies = list(cfg.heatmaps.policies) + [str(r / "policy") for r in runs if (r / "policy").is_dir()]
        skipped: list[dict] = []
        heat = placement_heatmaps(cfg.heatmaps.scenario, policies, cfg.heatmaps.epochs, cfg.heatmaps.seed, out, skipped)
        md += [
            "## Placements",
            "",
            f"Deployments held after {cfg.heatmaps.epochs} epochs on "
            f"`{cfg.heatmaps.scenario}` (layers × experts coloured by device, tier and bits; link loads).",
            "",
        ]
        for p in heat:
            images[p.stem] = p
            md += [f"![{p.stem}]({p.name})", ""]
        for k in skipped:
            md += [f"Skipped `{k['policy']}`: {k['reason']}.", ""]
    text = "\n".join(md)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.html", markdown_to_html(text, "CoEL-Gym comparison report", out))
    result = {
        "headline": [plain_text(h) for h in head],
        "report": str(out / "report.md"),
        "html": str(out / "report.html"),
        "images": len(images),
    }
    atomic_write_json(out / "report.json", result)  # the headline for `make run`'s final summary
    log_wandb(cfg, out, rows, images, text, head)
    return result


def log_wandb(
    cfg: DictConfig, out: Path, rows: list[dict], images: dict[str, Path], text: str, head: list[str] | None = None
) -> None:
    from agents.tracking import finish_wandb, init_wandb, log_artifact, use_artifact

    run = init_wandb(
        OmegaConf.to_container(cfg.logger, resolve=True),
        out,
        OmegaConf.to_container(cfg, resolve=True),
        name="compare",
        job_type="compare",
    )
    if run is None:
        return
    import wandb

    use_artifact(run, "leaderboard")  # lineage (online): what the report is built from

    if rows:
        cols = list(rows[0])
        run.log({"leaderboard": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])})
    run.log({k: wandb.Image(str(v)) for k, v in images.items()})
    if head:  # the headline at a glance: the run's summary and a text panel
        run.summary["headline"] = " ".join(plain_text(h) for h in head)
        run.log({"headline": wandb.Html("<br>".join(inline_html(h) for h in head))})
    if run.settings.mode == "online":
        try:  # optional: a W&B Report (needs the wandb-workspaces package)
            import wandb_workspaces.reports.v2 as wr

            report = wr.Report(project=run.project, title="CoEL-Gym comparison", description=text[:500])
            report.blocks = [wr.MarkdownBlock(text=text)]
            report.save()
        except ImportError:
            log.info("wandb-workspaces not installed: no W&B Report built (tables and images are logged)")
    files = [out / "report.md", out / "report.html", out / "report.json", *images.values()]
    log_artifact(run, "report", "report", files, {"headline": [plain_text(h) for h in head or []]})
    finish_wandb(run)


@hydra.main(version_base=None, config_path="../conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    result, _ = run_in_output_dir(lambda out: build_report(cfg, out))
    for line in result["headline"]:
        print(line)
    print(f"comparison report: {result['report']} ({result['html']})")


if __name__ == "__main__":
    main()
