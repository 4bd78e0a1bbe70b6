"""GPU benchmark of the real backend's MoE engine against Hugging Face transformers' eager Qwen2-MoE.

Full Qwen1.5-MoE-A2.7B architecture (24 layers, 60 routed experts top-4 + gated shared expert, 14.3 B parameters),
random bf16 weights, one GPU. Greedy decoding, input 128 tokens, output 64 and 512, batch 1 and 32.

    python benchmarks/bench_real_gpu.py --out benchmarks/results            # on a GPU machine
    python benchmarks/bench_real_gpu.py --model tiny-moe --device cpu --out /tmp/x   # smoke test anywhere

Writes real_gpu.json and real_gpu.md into --out. Timings: CUDA-synchronized wall clock, one warm-up run first.
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
from pathlib import Path

import torch

from coel_env.atomic import atomic_write_json, atomic_write_text
from coel_env.specs import model_preset
from real_backend.engine import FastMoE
from real_backend.model import MoEConfig, WeightSource, expert_names, generate, non_expert_shapes, reference_model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def hf_model(cfg: MoEConfig, device: str, dtype: torch.dtype):
    """transformers' Qwen2MoeForCausalLM (eager attention) with random weights built from our config."""
    import transformers
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    d = cfg.hf_config_dict()
    d.pop("model_type")
    hcfg = Qwen2MoeConfig(**d)
    hcfg._attn_implementation = "eager"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2MoeForCausalLM(hcfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval(), transformers.__version__


def load_ours_into_hf(model, cfg: MoEConfig, src: WeightSource, gate_first: bool = True) -> None:
    """Copy our (HF-named) weights into a transformers model, fused-expert (v5) or per-expert (v4) layout."""
    sd = model.state_dict()
    ne = src.non_expert()  # bf16 values, as every other consumer sees them
    with torch.no_grad():
        for n, t in ne.items():
            if n in sd:
                sd[n].copy_(t)
        for l in range(cfg.num_layers):
            p = f"model.layers.{l}.mlp.experts."
            ex = [tuple(t.float() for t in src.expert(l, e)) for e in range(cfg.num_experts)]
            if f"{p}gate_up_proj" in sd:
                gu = torch.stack([torch.cat([g, u] if gate_first else [u, g]) for g, u, _ in ex])
                dn = torch.stack([d for _, _, d in ex])
                tgt_gu, tgt_d = sd[f"{p}gate_up_proj"], sd[f"{p}down_proj"]
                tgt_gu.copy_(gu if tgt_gu.shape == gu.shape else gu.transpose(-2, -1))
                tgt_d.copy_(dn if tgt_d.shape == dn.shape else dn.transpose(-2, -1))
            else:
                for e in range(cfg.num_experts):
                    for name, t in zip(expert_names(cfg, l, e), ex[e]):
                        sd[name].copy_(t)


def parity(device: str, dtype: torch.dtype) -> dict:
    """Tiny model: FastMoE vs our reference, and our reference vs transformers on the same weights (fp32)."""
    cfg = MoEConfig.from_spec(model_preset("tiny-moe"))
    src = WeightSource(cfg, 0)
    model, experts = reference_model(cfg, 0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref_tok, ref_logits = generate(model, list(ids), [8, 8], experts)
    out = {}
    for mode in ("grouped", "gather"):
        fast = FastMoE(cfg, src, device=device, dtype=torch.float32, max_batch=2, max_len=64, expert_mode=mode)
        out[f"fast_{mode}_fp32_tokens_equal"] = fast.generate(ids.to(device), 8).tolist() == ref_tok
        if device == "cuda" and mode == "gather":  # fp32 grouped_mm is a host-synchronizing fallback
            fast.capture(2)
            out[f"fast_{mode}_graph_fp32_tokens_equal"] = fast.generate(ids.to(device), 8).tolist() == ref_tok
    fast16 = FastMoE(cfg, src, device=device, dtype=dtype, max_batch=2, max_len=64)
    if device == "cuda":
        fast16.capture(2)
    agree = (fast16.generate(ids.to(device), 8).cpu() == torch.tensor(ref_tok)).float().mean().item()
    out["fast_grouped_bf16_token_agreement"] = agree
    try:
        best = None
        for gate_first in (True, False):
            hf, _ = hf_model(cfg, "cpu", torch.float32)
            load_ours_into_hf(hf, cfg, src, gate_first)
            with torch.no_grad():
                lg = hf(ids).logits
            diff = (lg - torch.stack(ref_logits)).abs().max().item()
            if best is None or diff < best[0]:
                best = (diff, gate_first)
        out["hf_max_abs_logit_diff"], out["hf_gate_first"] = best
        covered = set(non_expert_shapes(cfg)) <= set(hf.state_dict())
        out["hf_names_match"] = covered
    except Exception as exc:  # transformers missing or changed: report, do not fail the benchmark
        out["hf_error"] = f"{type(exc).__name__}: {exc}"
    return out


COMPILE = False


def time_ours(engine: FastMoE, batch: int, n_in: int, n_out: int, device: str, graph: bool) -> dict:
    cfg = engine.cfg
    ids = torch.randint(0, cfg.vocab_size, (batch, n_in), device=device)
    engine.graph = None
    if graph:
        try:
            engine.capture(batch, compile=COMPILE)
        except Exception as exc:  # e.g. a kernel that syncs with the host: run eagerly, and say so
            print(f"graph capture failed ({engine.expert_mode}, batch {batch}): {exc}", flush=True)
            engine.graph = None
            torch.cuda.synchronize()
    engine.generate(ids, 4)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    nxt = engine.prefill(ids).argmax(-1)
    sync(device)
    t1 = time.perf_counter()
    pos = torch.full((batch,), n_in, dtype=torch.long, device=device)
    for _ in range(n_out - 1):
        nxt = engine.decode(nxt, pos).argmax(-1)
        pos += 1
    sync(device)
    t2 = time.perf_counter()
    return {
        "batch": batch,
        "input": n_in,
        "output": n_out,
        "ttft_s": t1 - t0,
        "decode_s": t2 - t1,
        "total_s": t2 - t0,
        "cuda_graph": engine.graph is not None,
        "tpot_ms": 1e3 * (t2 - t1) / max(n_out - 1, 1),
        "decode_tokens_per_s": batch * (n_out - 1) / (t2 - t1),
        "tokens_per_s": batch * n_out / (t2 - t0),
    }


def time_hf(model, batch: int, n_in: int, n_out: int, vocab: int, device: str) -> dict:
    ids = torch.randint(0, vocab, (batch, n_in), device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n_out, min_new_tokens=n_out, **kw)
        sync(device)
        t = time.perf_counter() - t0
    n = out.shape[1] - n_in
    return {"batch": batch, "input": n_in, "output": n, "total_s": t, "tokens_per_s": batch * n / t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen1.5-moe-a2.7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="real_gpu")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--outputs", default="64,512")
    ap.add_argument("--input", type=int, default=128)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step before graph capture")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--modes", default="grouped,gather", help="expert kernels to try at batch 1")
    ap.add_argument("--hf-budget-s", type=float, default=240.0, help="skip remaining HF runs past this many seconds")
    args = ap.parse_args()
    global COMPILE
    COMPILE = args.compile
    dev = args.device
    t_start = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",")]
    outputs = [int(o) for o in args.outputs.split(",")]
    res: dict = {
        "model": args.model,
        "device": dev,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if dev == "cuda" else platform.processor(),
        "input": args.input,
        "runs": [],
        "hf_runs": [],
    }
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    res["compile"] = args.compile
    res["parity"] = {} if args.skip_parity else parity(dev, dtype)
    print("parity", res["parity"], flush=True)
    cfg = MoEConfig.from_spec(model_preset(args.model))
    t0 = time.perf_counter()
    max_len = args.input + max(outputs) + 8
    engine = FastMoE(
        cfg, WeightSource(cfg, 0, gen_device=dev), device=dev, dtype=dtype, max_batch=max(batches), max_len=max_len
    )
    sync(dev)
    res["build_s"] = time.perf_counter() - t0
    if dev == "cuda":
        res["weights_gb"] = torch.cuda.memory_allocated() / 1e9
    print(f"built in {res['build_s']:.1f}s", flush=True)
    # pick the expert kernel for batch 1 (grouped matmul vs gathered GEMV), eager and graph
    modes = {}
    for mode in args.modes.split(","):
        engine.expert_mode = mode
        try:
            modes[mode] = time_ours(engine, 1, args.input, min(32, max(outputs)), dev, graph=dev == "cuda")["tpot_ms"]
        except Exception as exc:
            modes[mode] = f"{type(exc).__name__}: {exc}"
    res["batch1_tpot_ms_by_expert_mode"] = modes
    ok = {m: v for m, v in modes.items() if isinstance(v, float)}
    best1 = min(ok, key=ok.get) if ok else "loop"
    print("modes", modes, flush=True)
    for b in batches:
        engine.expert_mode = best1 if b * cfg.top_k <= 16 else "grouped"
        for o in outputs:
            r = time_ours(engine, b, args.input, o, dev, graph=dev == "cuda")
            r["expert_mode"] = engine.expert_mode
            res["runs"].append(r)
            print("ours", r, flush=True)
    if dev == "cuda":
        engine.expert_mode = best1
        r = time_ours(engine, 1, args.input, outputs[0], dev, graph=False)
        r["expert_mode"] = best1
        res["runs"].append(r)
        print("ours eager", r, flush=True)
        res["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del engine
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_hf:
        try:
            t0 = time.perf_counter()
            model, ver = hf_model(cfg, dev, dtype)
            res["hf_build_s"], res["transformers"] = time.perf_counter() - t0, ver
            res["hf_attn"] = model.config._attn_implementation
            res["hf_experts_impl"] = getattr(model.config, "_experts_implementation", None)
            for b in batches:
                for o in outputs:
                    if time.perf_counter() - t_start > args.hf_budget_s + 120:
                        res["hf_runs"].append({"batch": b, "output": o, "skipped": "time budget"})
                        continue
                    r = time_hf(model, b, args.input, o, cfg.vocab_size, dev)
                    res["hf_runs"].append(r)
                    print("hf", r, flush=True)
        except Exception as exc:
            res["hf_error"] = f"{type(exc).__name__}: {exc}"
            print("hf error", res["hf_error"], flush=True)
    res["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{args.name}.json", res)
    atomic_write_text(out / f"{args.name}.md", markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    lines = [
        f"# Real backend engine vs transformers eager — {res['model']} on {res['gpu']}",
        "",
        f"torch {res['torch']}, transformers {res.get('transformers', '-')}, input {res['input']} tokens, "
        "greedy, random bf16 weights.",
        "",
        "| engine | batch | output | TTFT s | TPOT ms | decode tok/s | end-to-end tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["runs"]:
        comp = ", torch.compile" if res.get("compile") and r["cuda_graph"] else ""
        eng = f"FastMoE ({r['expert_mode']}{comp}{', CUDA graph' if r['cuda_graph'] else ', eager'})"
        lines.append(
            f"| {eng} | {r['batch']} | {r['output']} | {r['ttft_s']:.3f} | {r['tpot_ms']:.2f} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['tokens_per_s']:.1f} |"
        )
    for r in res["hf_runs"]:
        if "skipped" in r:
            lines.append(f"| HF eager | {r['batch']} | {r['output']} | skipped ({r['skipped']}) | | | |")
        else:
            lines.append(f"| HF eager (generate) | {r['batch']} | {r['output']} | | | | {r['tokens_per_s']:.1f} |")
    lines += [
        "",
        f"Parity (tiny model): {res['parity']}",
        "",
        f"Batch-1 TPOT by expert kernel (ms): {res.get('batch1_tpot_ms_by_expert_mode')}",
        "",
    ]
    if "hf_error" in res:
        lines.append(f"HF baseline error: {res['hf_error']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
