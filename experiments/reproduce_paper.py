"""Reproduce the seed paper's three experiments (CoEL, DESIGN.md §3) on the surrogate.

fig4: generation throughput vs output length (input 128), one server with 2 GPUs vs two servers with 1 GPU each;
fig5: end-to-end latency for the same sweep; fig6: latency vs input length (output 128), 2 vs 3 servers.
Writes fig4.csv, fig5.csv, fig6.csv, figures.png and results.json to the Hydra output dir.

Two loads. `load=concurrent` (the default; the paper's numbers come from vLLM under concurrent load): a closed loop
of `in_flight` requests in the whole cluster, split evenly over its servers, a new one as one finishes (a throughput
benchmark that submits its prompts at once), served with continuous batching of up to `max_num_seqs` sequences
per server (vLLM's default 256; the KV cache the plan leaves may allow fewer) (`serving: continuous`; without a
`hardware=` choice the `continuous` profile). Throughput is the cluster's generated tokens/s, latency the mean
end-to-end time including the wait for a batch slot. `load=single`: one request at a time (per-request speed).

Two engines. `engine=vllm` (the default: what the paper measured): vLLM's own parallelism, tensor parallel over the
one server's two GPUs and pipeline parallel over two or three servers (`coel_env/backend/parallel.py`), all experts
at 16 bits. `engine=coel`: CoEL's expert placement (`plan=`, the uniform one by default) on the surrogate.

    python -m experiments.reproduce_paper [load=single] [engine=coel] [in_flight=256] [output_lens=[64,2048]]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from coel_env.atomic import atomic_write_json
from coel_env.backend.parallel import serve_parallel
from coel_env.backend.surrogate import SurrogateBackend
from coel_env.errors import CoELError, ConfigError
from coel_env.specs import HardwareProfile, LengthDist, load_hardware_profile, load_scenario_spec
from coel_env.specs.bounds import MAX_BATCH, MAX_LENGTH_TOKENS
from coel_env.world.state import Scenario
from experiments.cli_checks import error_line, require_int, require_int_in, require_int_list
from experiments.plan_io import hardware_args, hardware_from_cfg, initial_state, resolve_plan
from experiments.results_io import save_png, write_csv

log = logging.getLogger(__name__)


LOADS = ("concurrent", "single")
ENGINES = ("vllm", "coel")


def check(cfg: DictConfig) -> None:
    """Refuse bad command-line values in one line, before any scenario is built or any file written."""
    require_int(cfg.seed, "seed", 0)
    if cfg.load not in LOADS:
        raise ConfigError(f"load: '{cfg.load}'; allowed: {', '.join(LOADS)}")
    if cfg.engine not in ENGINES:
        raise ConfigError(f"engine: '{cfg.engine}'; allowed: {', '.join(ENGINES)}")
    require_int_in(cfg.in_flight, "in_flight", 3, MAX_BATCH)
    require_int_in(cfg.max_num_seqs, "max_num_seqs", 1, MAX_BATCH)
    for key in ("input_len_fixed", "output_len_fixed"):
        require_int_in(cfg[key], key, 1, MAX_LENGTH_TOKENS)
    for key in ("output_lens", "input_lens"):
        require_int_list(cfg[key], key, 1, MAX_LENGTH_TOKENS)
    for key in ("single_server", "two_servers", "three_servers"):
        load_scenario_spec(str(cfg.setups[key]))
    hardware_from_cfg(cfg)


def load_hardware(cfg: DictConfig) -> HardwareProfile | None:
    """The profile every setup uses: `hardware=` (with serving: continuous under the concurrent load), else the
    `continuous` profile (concurrent) or each scenario's own (single)."""
    chosen = hardware_from_cfg(cfg)
    if cfg.load == "single":
        return chosen
    if chosen is None:
        return load_hardware_profile("continuous")
    return chosen.model_copy(update={"serving": "continuous"})


def measure(scenario_name, input_len: int, output_len: int, cfg: DictConfig) -> dict:
    """Latency and throughput of one setup (`scenario_name`: a registry name, path, dict or spec) on the configured
    engine: under the concurrent load the cluster's tokens/s, one request at a time its per-request speed."""
    spec = load_scenario_spec(scenario_name)
    update = {  # validated: a bad length fails here, not in the kernels
        "input_len": LengthDist(dist="fixed", mean=input_len),
        "output_len": LengthDist(dist="fixed", mean=output_len),
    }
    concurrent = cfg.load == "concurrent"
    vllm = cfg.engine == "vllm"
    if concurrent:
        update["concurrency"] = max(int(cfg.in_flight) // len(spec.servers), 1)
        update["max_batch"] = int(cfg.max_num_seqs)
    elif vllm:  # one engine, one request at a time: a closed loop of one
        update["concurrency"] = 1
        update["max_batch"] = 1
    workload = spec.workload.model_validate({**spec.workload.model_dump(), **update})
    hardware = load_hardware(cfg)
    if vllm and cfg.load == "single":  # the engine's continuous batching at batch 1 is one request at a time
        hardware = (hardware or load_hardware_profile("continuous")).model_copy(update={"serving": "continuous"})
    scenario = Scenario(spec.model_copy(update={"workload": workload}), seed=cfg.seed, hardware=hardware)
    if vllm:
        r = serve_parallel(scenario.cluster, initial_state(scenario, cfg.seed), clients=None if concurrent else 1)
        tok_s = r.tokens_per_s if concurrent else output_len / r.e2e_s
        return {"latency_s": r.e2e_s, "tok_s": tok_s, "ttft_s": r.ttft_s, "tpot_s": r.tpot_s}
    plan = resolve_plan(str(cfg.plan), scenario).validate(scenario.cluster)
    metrics = SurrogateBackend(scenario.cluster).serve(plan, initial_state(scenario, cfg.seed), window_s=60.0)
    return {
        "latency_s": metrics.e2e_mean_s,
        "tok_s": metrics.tokens_per_s if concurrent else metrics.request_tokens_per_s,
        "ttft_s": metrics.ttft_mean_s,
        "tpot_s": metrics.tpot_mean_s,
    }


def run(cfg: DictConfig) -> dict:
    s = cfg.setups
    fig4, fig5, fig6 = [], [], []
    for out_len in cfg.output_lens:
        one = measure(s.single_server, cfg.input_len_fixed, out_len, cfg)
        two = measure(s.two_servers, cfg.input_len_fixed, out_len, cfg)
        fig4.append({"output_len": out_len, "single_server_tok_s": one["tok_s"], "two_servers_tok_s": two["tok_s"]})
        fig5.append(
            {
                "output_len": out_len,
                "single_server_latency_s": one["latency_s"],
                "two_servers_latency_s": two["latency_s"],
            }
        )
    for in_len in cfg.input_lens:
        two = measure(s.two_servers, in_len, cfg.output_len_fixed, cfg)
        three = measure(s.three_servers, in_len, cfg.output_len_fixed, cfg)
        fig6.append(
            {
                "input_len": in_len,
                "two_servers_latency_s": two["latency_s"],
                "three_servers_latency_s": three["latency_s"],
            }
        )
    load = {"mode": cfg.load, "engine": cfg.engine}
    if cfg.load == "concurrent":
        load.update(in_flight=int(cfg.in_flight), max_num_seqs=int(cfg.max_num_seqs), serving="continuous")
    return {"fig4": fig4, "fig5": fig5, "fig6": fig6, "load": load}


def write_outputs(results: dict, out: Path) -> None:
    """fig*.csv, results.json and figures.png, each written atomically (never half a file)."""
    for name in ("fig4", "fig5", "fig6"):
        write_csv(out / f"{name}.csv", results[name])
    atomic_write_json(out / "results.json", results, indent=2)
    plot(results, out / "figures.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        (
            "fig4",
            "output_len",
            [("single_server_tok_s", "1 server, 2 GPUs"), ("two_servers_tok_s", "2 servers, 1 GPU")],
            "generation throughput (tokens/s)",
            "(a) throughput vs output length (input 128)",
        ),
        (
            "fig5",
            "output_len",
            [("single_server_latency_s", "1 server, 2 GPUs"), ("two_servers_latency_s", "2 servers, 1 GPU")],
            "end-to-end latency (s)",
            "(b) latency vs output length (input 128)",
        ),
        (
            "fig6",
            "input_len",
            [("two_servers_latency_s", "2 servers"), ("three_servers_latency_s", "3 servers")],
            "end-to-end latency (s)",
            "(c) latency vs input length (output 128)",
        ),
    ]
    for ax, (key, xkey, series, ylabel, title) in zip(axes, panels):
        rows = results[key]
        xs = [r[xkey] for r in rows]
        for col, label in series:
            ax.plot(xs, [r[col] for r in rows], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xkey.replace("_", " "))
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    load = results["load"]
    how = (
        f"{load['in_flight']} requests in flight, continuous batching"
        if load["mode"] == "concurrent"
        else "one request at a time"
    )
    fig.suptitle(f"Seed-paper experiments on the CoEL-Gym surrogate (Qwen1.5-MoE-A2.7B, RTX 4090D, 1 GbE; {how})")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


@hydra.main(version_base=None, config_path="../conf", config_name="reproduce_paper")
def reproduce(cfg: DictConfig) -> None:
    out = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    try:
        check(cfg)
        results = run(cfg)
    except CoELError as exc:
        raise SystemExit(error_line(exc, out)) from None
    write_outputs(results, out)
    f4, f6 = results["fig4"], results["fig6"]
    log.info(
        "fig4 @%d out: 1 server %.1f tok/s vs 2 servers %.1f tok/s",
        f4[-1]["output_len"],
        f4[-1]["single_server_tok_s"],
        f4[-1]["two_servers_tok_s"],
    )
    log.info(
        "fig6 @%d in: 2 servers %.2f s vs 3 servers %.2f s",
        f6[-1]["input_len"],
        f6[-1]["two_servers_latency_s"],
        f6[-1]["three_servers_latency_s"],
    )
    print(f"paper reproduction written to {out}")


def main() -> None:
    try:
        sys.argv[1:] = hardware_args(sys.argv[1:])
    except CoELError as exc:
        raise SystemExit(f"error: {exc}") from None
    reproduce()


if __name__ == "__main__":
    main()
