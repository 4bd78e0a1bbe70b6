"""Micro sweeps on a GPU machine -> conf/hardware/<name>.yaml (no Hydra: the device image lacks it).

python3 -m experiments.calib.gpu_profile --out $OUT --profile h100 --device-name h100-sxm
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from coel_env.atomic import atomic_write_json
from coel_env.world.state import Scenario
from experiments.calib.micro import base_profile, fit_raw, micro
from experiments.calib.profile import write_profile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--device-name", default="h100-sxm", help="device preset the measured numbers replace")
    ap.add_argument("--scenario", default="paper-testbed", help="its model shapes the attention/tier sweeps")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--raw", default=None, help="refit the raw rows of an earlier sweeps json instead of measuring")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = SimpleNamespace(
        profile=a.profile,
        device="cuda",
        seed=0,
        sweeps=SimpleNamespace(
            reps=a.reps,
            expert_shapes=[[2048, 1408], [2048, 5632], [4096, 14336]],
            tokens=[1, 4, 16, 64, 256, 1024, 4096],
            bits=[16, 8, 4],
            contexts=[128, 512, 2048, 8192],
            message_bytes=[8, 4096, 65536, 1048576, 16777216],
            shaper_bytes=[4096, 65536, 1048576],
        ),
    )
    sc = Scenario(a.scenario)
    t0 = time.perf_counter()
    if a.raw:
        raw = json.loads(Path(a.raw).read_text())["raw"]
        fits = fit_raw(raw, cfg)
        name = json.loads(Path(a.raw).read_text()).get("gpu", "NVIDIA H100 80GB HBM3")
    else:
        raw, fits = micro(cfg, sc)
        name = torch.cuda.get_device_name()
    prof = base_profile(cfg, sc, fits, device_names=[a.device_name])
    # eager decode: one token's attention block per layer (launch-bound) is the per-layer overhead
    prof = prof.model_copy(
        update={"layer_overhead_s": fits["attention"]["base_s"], "source": f"experiments.calib.gpu_profile on {name}"}
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = write_profile(
        prof,
        f"Hardware profile '{a.profile}' measured by experiments.calib.gpu_profile on "
        f"{name} (micro sweeps of real_backend modules).\n"
        f"Raw sweeps and fits: benchmarks/results/calibration/sweeps_{a.profile}.json",
        out / f"{a.profile}.yaml",
    )
    atomic_write_json(
        out / f"sweeps_{a.profile}.json",
        {"raw": raw, "fits": fits, "gpu": name, "wall_s": time.perf_counter() - t0},
        default=float,
    )
    print(path.read_text())
    print(json.dumps(fits, indent=1, default=float)[:4000])


if __name__ == "__main__":
    main()
