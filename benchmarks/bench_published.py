"""The surrogate's predictions against published serving measurements (benchmarks/published_serving.yaml).

    python benchmarks/bench_published.py

Writes benchmarks/results/published/comparison.{json,md}. A baseline of the serving model as it is: nothing here is
tuned to the published numbers. Each entry becomes a one-server scenario (a dict for `make_scenario`):

- model: the repo preset named in the entry's model string; GPU: the repo device whose name the GPU string contains
  (an A100 of unstated memory is a100-80gb, an H100 of unstated variant h100-sxm: flagged);
  the entry's GPU count (unstated: 1, flagged) as one server's GPUs (the surrogate runs the non-expert part tensor
  parallel over a server's GPUs; GPU-to-GPU traffic inside a server is not costed, so NVLink vs PCIe is moot).
- plan: `DeploymentPlan.uniform` (contiguous (layer, expert) blocks over the GPUs, one replica each), all experts on
  GPUs at the entry's bit-width (16 for bf16/auto/unstated, 8 for int8, 4 for 4-bit); skipped if they do not fit.
- workload: fixed input/output lengths (the stated numbers; ShareGPT: the token totals in the notes / num_prompts).
  batch1 -> arrival 1e-4 req/s, max_batch 1. throughput, or serving with a fixed concurrency -> a saturating arrival
  rate (1e4 req/s, the schema's maximum: the surrogate then serves its capacity and drops the rest; checked against
  half that rate) and max_batch = the stated concurrency, else the engine's default cap (vLLM max_num_seqs 256;
  LMDeploy max_batch_size 128; SGLang has no fixed cap, so all prompts, flagged).
- hardware profiles: `default` (one batch estimate + M/D/1 queueing), `continuous` (continuous batching under the
  KV-cache limit), plus any shipped profile fitted on the entry's GPU with our own engine (h100, h200). Entries on
  several GPUs get one more row, `continuous (tp)`: the engines' own tensor parallelism (every expert split over the
  GPUs, two all-reduces per layer: `coel_env/backend/parallel.py`) instead of the uniform expert placement.
- metric: tok/s at batch 1 = output_len / e2e_mean_s (the entries time whole generate() calls, prefill included);
  tok/s otherwise = tokens_per_s; an end-to-end latency = e2e_mean_s; TPOT or ms/token = tpot_mean_s.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import yaml

from coel_env import ConfigError, DeploymentPlan, Metrics, PlanError, SurrogateBackend, make_scenario
from coel_env.backend.parallel import serve_parallel

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "benchmarks" / "published_serving.yaml"
OUT_DIR = ROOT / "benchmarks" / "results" / "published"
COMMAND = "python benchmarks/bench_published.py"

MODELS = ("mixtral-8x7b", "deepseek-v2-lite", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "olmoe-1b-7b")
GPUS = {"a100": "a100-80gb", "h100": "h100-sxm", "h200": "h200", "4090": "rtx4090"}
GPU_PROFILES = {"h100-sxm": ("h100",), "h200": ("h200",)}  # profiles fitted on that GPU (our own engine)
BASE_PROFILES = ("default", "continuous")  # uncalibrated constants: one batch estimate + M/D/1, or continuous batching
BITS = {"int8": 8, "q4_0": 4, "int4": 4, "awq": 4, "bfloat16": 16, "bf16": 16, "auto": 16}  # quantized first
ENGINE_CAPS = {"vllm": 256, "lmdeploy": 128}
TP_PROFILE = "continuous (tp)"
BATCH1_RATE = 1e-4
SATURATING_RATE = 1e4  # the schema's maximum: the Little's-law batch estimate then reaches max_batch
WINDOW_S = 60.0
TOTALS = re.compile(r"Totals:\s*([\d,]+)\s+(?:input|prompt)\s*/\s*([\d,]+)\s+(?:generated|completion)")


class Unmappable(Exception):
    """An entry whose setup the repo cannot express (the message says why)."""


def map_entry(entry: dict) -> dict[str, Any]:
    """The entry's setup in the repo's terms (model, device, GPUs, bits, lengths, workload, metric, assumptions);
    raises Unmappable with the reason where a part cannot be mapped."""
    flags: list[str] = []
    text = entry["model"].lower().replace("_", "-")
    model = next((m for m in MODELS if m in text), None)
    if model is None:
        raise Unmappable(f"model '{entry['model']}' has no repo preset")
    gpu = (entry.get("gpu") or "").lower()
    if not gpu:
        raise Unmappable("GPU not stated in the source")
    device = next((d for key, d in GPUS.items() if key in gpu), None)
    if device is None:
        raise Unmappable(f"GPU '{entry['gpu']}' has no repo device preset")
    if "not stated" in gpu or "inferred" in gpu:
        flags.append(f"GPU given as '{entry['gpu']}': {device} assumed")
    if "power-limited" in gpu:
        flags.append("GPU power limit not modelled")
    num_gpus = entry.get("num_gpus")
    if num_gpus is None:
        num_gpus = 1
        flags.append("GPU count not stated: 1 assumed")
    dtype = (entry.get("dtype") or "").lower()
    bits = next((b for key, b in BITS.items() if key in dtype), None) if dtype else 16
    if not dtype:
        flags.append("dtype not stated: 16-bit assumed")
    if bits is None:
        raise Unmappable(f"dtype '{entry['dtype']}' is not one of the repo's bit-widths 16/8/4")
    if bits < 16:
        flags.append(f"only routed experts are {bits}-bit in the surrogate; the rest stays 16-bit")
    input_len, output_len = lengths(entry)
    rate, max_batch, how = workload(entry, flags)
    return dict(
        model=model,
        device=device,
        num_gpus=int(num_gpus),
        tensor_parallel=entry.get("tensor_parallel"),
        engine=entry.get("engine"),
        bits=bits,
        input_len=input_len,
        output_len=output_len,
        arrival_rate=rate,
        max_batch=max_batch,
        workload=how,
        metric=metric_field(entry),
        profiles=[*BASE_PROFILES, *GPU_PROFILES.get(device, ())],
        assumptions=flags,
    )


def lengths(entry: dict) -> tuple[float, float]:
    """Mean input and output lengths: the stated numbers, or (ShareGPT) the notes' token totals / num_prompts."""
    w = entry["workload"]
    found = TOTALS.search(entry.get("notes") or "")
    out = []
    for i, key in enumerate(("input_len", "output_len")):
        v = w.get(key)
        if isinstance(v, (int, float)):
            out.append(float(v))
        elif found and w.get("num_prompts"):
            out.append(int(found.group(i + 1).replace(",", "")) / w["num_prompts"])
        else:
            raise Unmappable(f"{key} '{v}' is not numeric and the notes give no token totals with num_prompts")
    return out[0], out[1]


def workload(entry: dict, flags: list[str]) -> tuple[float, int, str]:
    """(arrival rate req/s, max_batch, how it was mapped) for the entry's workload kind."""
    w = entry["workload"]
    if w["kind"] == "batch1":
        return BATCH1_RATE, 1, f"batch 1: arrival {BATCH1_RATE:g} req/s, max_batch 1"
    concurrency, prompts = w.get("concurrency"), w.get("num_prompts")
    if w["kind"] == "serving" and not concurrency:
        raise Unmappable("open-loop serving without a fixed concurrency is not mapped (rate-dependent)")
    if concurrency:
        cap, why = int(concurrency), f"stated concurrency {concurrency}"
    else:
        engine = (entry.get("engine") or "").lower()
        cap = next((c for key, c in ENGINE_CAPS.items() if engine.startswith(key)), None)
        why = f"{engine.split(' ')[0]} default cap {cap}"
        if engine.startswith("sglang") and prompts:
            cap, why = int(prompts), f"all {prompts} prompts (SGLang: no fixed cap)"
            flags.append("SGLang's max_running_requests derives from its KV pool: assumed not binding")
        if cap is None:
            raise Unmappable(f"engine '{entry.get('engine')}': its default batch cap is unknown")
        cap = min(cap, int(prompts)) if prompts else cap
    how = f"saturating: arrival {SATURATING_RATE:g} req/s, max_batch {cap} ({why})"
    return SATURATING_RATE, cap, how


def metric_field(entry: dict) -> str:
    """Which surrogate quantity the entry's metric is (a name `predicted_value` knows)."""
    unit, metric, kind = entry["unit"], entry["metric"].lower(), entry["workload"]["kind"]
    if unit == "tokens/s":
        return "output_len / e2e_mean_s" if kind == "batch1" else "tokens_per_s"
    if unit == "s" and "end-to-end" in metric:
        return "e2e_mean_s"
    if unit in ("ms", "ms/token") and ("tpot" in metric or "per output token" in metric):
        return "1e3 * tpot_mean_s"
    raise Unmappable(f"metric '{entry['metric']}' [{unit}] has no surrogate counterpart")


def predicted_value(field: str, m: Metrics, output_len: float) -> float:
    """The value of `field` (from `metric_field`) in the surrogate's metrics."""
    return {
        "output_len / e2e_mean_s": lambda: output_len / m.e2e_mean_s,
        "tokens_per_s": lambda: m.tokens_per_s,
        "e2e_mean_s": lambda: m.e2e_mean_s,
        "1e3 * tpot_mean_s": lambda: 1e3 * m.tpot_mean_s,
    }[field]()


def scenario_dict(entry_id: str, setup: dict, profile: str) -> dict:
    """One server with the entry's GPUs, fixed lengths, a static cluster (no dynamics), one replica per expert."""
    return {
        "name": f"published-{entry_id}",
        "description": f"published serving check: {entry_id}",
        "model": setup["model"],
        "hardware": profile,
        "servers": [
            {"name": "server1", "gpus": [setup["device"]] * setup["num_gpus"], "cpu": "xeon-edge", "cpu_ram_gb": 256}
        ],
        "topology": {"kind": "star", "bandwidth_gbps": 100.0, "latency_ms": 0.0},
        "workload": {
            "arrival_rate": setup["arrival_rate"],
            "input_len": {"dist": "fixed", "mean": setup["input_len"]},
            "output_len": {"dist": "fixed", "mean": setup["output_len"]},
            "max_batch": setup["max_batch"],
            # a step's token budget (vLLM max_num_batched_tokens): its default, or the batch where that is larger
            "max_num_batched_tokens": max(2048, setup["max_batch"]),
            "slo_s": 3600,
        },
        "routing": {"num_domains": 1, "zipf_alpha": 0.25, "domain_overlap": 1.0, "affinity": 0.6},
        "dynamics": {"drift_rate": 0, "domain_switch_rate": 0, "arrival_burstiness": 0, "resource_noise": 0},
        "max_replicas": 1,
    }


def predict(entry_id: str, setup: dict, profile: str) -> Metrics:
    """Serve one window of the entry's scenario with the uniform plan at the entry's bit-width, all on GPUs."""
    scenario = make_scenario(scenario_dict(entry_id, setup, profile))
    cluster = scenario.cluster
    plan = DeploymentPlan.uniform(cluster)
    if (plan.tier != 0).any() or (plan.bits < setup["bits"]).any():
        raise Unmappable(
            f"{setup['model']} does not fit on {setup['num_gpus']}x {setup['device']} at {setup['bits']} bits "
            f"(the uniform plan falls back to {int(plan.bits.min())} bits / tier {int(plan.tier.max())})"
        )
    plan.bits[plan.device >= 0] = setup["bits"]
    plan.validate(cluster)
    state = scenario.initial_state(np.random.default_rng(0))
    return SurrogateBackend(cluster).serve(plan, state, WINDOW_S)


def predict_tp(entry_id: str, setup: dict) -> SimpleNamespace:
    """The entry's scenario on the tensor-parallel engine (`serve_parallel`) under the continuous profile, as the
    Metrics fields `predicted_value` reads."""
    scenario = make_scenario(scenario_dict(entry_id, setup, "continuous"))
    r = serve_parallel(scenario.cluster, scenario.initial_state(np.random.default_rng(0)), bits=setup["bits"])
    if r.kv_sequences < 1:
        raise Unmappable(f"{setup['model']} at {setup['bits']} bits leaves no KV room on {setup['num_gpus']} GPUs")
    return SimpleNamespace(
        tokens_per_s=r.tokens_per_s,
        ttft_mean_s=r.ttft_s,
        tpot_mean_s=r.tpot_s,
        e2e_mean_s=r.e2e_s,
        dropped_frac=r.dropped_frac,
    )


def compare(entry: dict) -> list[dict]:
    """One result row per hardware profile for a mappable entry; one skipped row otherwise."""
    base = {"id": entry["id"], "model": entry["model"], "gpu": entry.get("gpu"), "source": entry["source"]}
    base.update(published=entry["value"], unit=entry["unit"], metric=entry["metric"])
    try:
        setup = map_entry(entry)
        rows = []
        profiles = [*setup["profiles"], *([TP_PROFILE] if setup["num_gpus"] > 1 else [])]
        for profile in profiles:
            tp = profile == TP_PROFILE
            m = predict_tp(entry["id"], setup) if tp else predict(entry["id"], setup, profile)
            pred = predicted_value(setup["metric"], m, setup["output_len"])
            ratio = pred / entry["value"]
            raw = {k: getattr(m, k) for k in ("tokens_per_s", "ttft_mean_s", "tpot_mean_s", "e2e_mean_s")}
            raw["dropped_frac"] = m.dropped_frac
            if setup["arrival_rate"] == SATURATING_RATE:  # a plateau: half the rate serves as many tokens
                slower = {**setup, "arrival_rate": SATURATING_RATE / 2}
                half = predict_tp(entry["id"], slower) if tp else predict(entry["id"], slower, profile)
                raw["saturated"] = bool(abs(half.tokens_per_s / m.tokens_per_s - 1.0) < 1e-6)
            rows.append(
                {
                    **base,
                    "profile": profile,
                    "setup": {k: v for k, v in setup.items() if k != "profiles"},
                    "predicted": pred,
                    "ratio": ratio,
                    "within_30pct": bool(math.isfinite(ratio) and abs(ratio - 1.0) <= 0.3),
                    "surrogate": raw,
                }
            )
        return rows
    except (Unmappable, ConfigError, PlanError) as exc:
        return [{**base, "skipped": True, "reason": str(exc)}]


def markdown(rows: list[dict], date: str) -> str:
    """The comparison table, then the skipped entries with reasons, then the command and date."""
    done = [r for r in rows if not r.get("skipped")]
    lines = [
        "# Surrogate vs published serving measurements",
        "",
        "The serving models as they are (nothing tuned to these numbers). Ratio = predicted / published.",
        "",
        "| id | model | GPU×n | workload | metric | profile | published | predicted | ratio | ±30% | source |",
        "|---|---|---|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in done:
        s = r["setup"]
        work = f"{r['setup']['workload']}; in {s['input_len']:.0f} / out {s['output_len']:.0f} tok"
        lines.append(
            f"| {r['id']} | {s['model']} ({s['bits']}-bit) | {s['device']}×{s['num_gpus']} | {work} | "
            f"{s['metric']} [{r['unit']}] | {r['profile']} | {r['published']:.4g} | {r['predicted']:.4g} | "
            f"{r['ratio']:.2f} | {'yes' if r['within_30pct'] else 'no'} | {r['source'].split()[0]} |"
        )
    lines += ["", "Assumptions per mapped entry:", ""]
    seen: set[str] = set()
    for r in done:
        if r["id"] not in seen and r["setup"]["assumptions"]:
            lines.append(f"- {r['id']}: {'; '.join(r['setup']['assumptions'])}")
        if r["surrogate"].get("saturated") is False:
            lines.append(f"- {r['id']} ({r['profile']}): NOT saturated at {SATURATING_RATE:g} req/s")
        seen.add(r["id"])
    lines += ["", "## Skipped", "", "| id | reason |", "|---|---|"]
    lines += [f"| {r['id']} | {r['reason']} |" for r in rows if r.get("skipped")]
    lines += ["", f"Command: `{COMMAND}` — run {date}.", ""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> None:
    """Compare every published entry, write comparison.json and comparison.md, print the table."""
    entries = yaml.safe_load(PUBLISHED.read_text(encoding="utf-8"))
    rows = [row for entry in entries for row in compare(entry)]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = {"command": COMMAND, "date": date, "published": str(PUBLISHED.relative_to(ROOT)), "results": rows}
    write_atomic(OUT_DIR / "comparison.json", json.dumps(report, indent=1) + "\n")
    text = markdown(rows, date)
    write_atomic(OUT_DIR / "comparison.md", text)
    print(text)


if __name__ == "__main__":
    main()
