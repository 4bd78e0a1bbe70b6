"""Limits of the specs, each defined once.

Caps on sizes are checked while a spec is validated, before any array is allocated; caps on physical quantities
keep every product the surrogate forms (bytes, FLOP/s, seconds) finite on its way to the numba kernels. Every cap
is far above the shipped presets: DeepSeek-V3 has 61 layers and 256 experts, the largest scenario (deepseek-scale)
64 servers, no shipped length distribution has a sigma above 0.7.
"""

from __future__ import annotations

from pydantic import AfterValidator

# ---- model sizes -------------------------------------------------------------------------------------------------
MAX_LAYERS = 1024
MAX_EXPERTS = 4096
MAX_D_MODEL = 65536
MAX_D_FF = 1 << 20  # expert, shared and dense MLP widths
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_VOCAB = 1 << 22
MAX_ROUTING_ENTRIES = 1 << 26  # MoE layers x experts^2: the routing generator's inter-layer affinity [L-1, E, E]

# ---- scenario sizes ----------------------------------------------------------------------------------------------
MAX_SERVERS = 256
MAX_GPUS_PER_SERVER = 64  # with MAX_SERVERS, device ids stay within the plans' int16
MAX_REPLICAS = 8
MAX_DOMAINS = 256
MAX_BATCH = 65536
MAX_LENGTH_TOKENS = 1 << 20  # mean input/output length of a request
MAX_POPULARITY_ENTRIES = 1 << 24  # servers (and domains) x MoE layers x experts: popularity arrays [S, L, E]
MAX_ROUTE_ENTRIES = 1 << 24  # server pairs x physical links: the cluster's route matrix [P, K]

# ---- physical quantities -----------------------------------------------------------------------------------------
MAX_GB = 1e6  # memory and storage capacities, GB
MAX_GBS = 1e6  # bandwidths: GB/s (memory, PCIe, SSD) or Gb/s (network links)
MAX_TFLOPS = 1e6
MAX_WATTS = 1e6
MAX_SECONDS = 1e6  # latencies (links: in ms, same cap), overheads, epochs, SLOs, budgets
MAX_ARRIVAL_RATE = 1e4  # requests/s per server
MAX_SIGMA = 3.0  # lognormal sigma (request lengths, arrival burstiness)
MAX_UNIFORM_SPREAD = 1.0  # uniform lengths are mean x (1 ± spread): above 1 some would be negative
MAX_ZIPF_ALPHA = 10.0
MAX_SLOWDOWN = 1e4  # time multiplier of low-bit kernels
MAX_OVERSUBSCRIPTION_EXPONENT = 10.0
MAX_ROW_HEADER_BYTES = 1 << 20


def _fmt(x: float) -> str:
    """A number as a person writes it: 100 rather than 100.0, 1e+300 rather than 301 digits."""
    return str(int(x)) if isinstance(x, float) and x.is_integer() and abs(x) < 1e16 else str(x)


def at_most(cap: float) -> AfterValidator:
    """A pydantic after-validator refusing a value above `cap` with one line naming both (None passes)."""

    def check(value):
        if value is not None and value > cap:
            raise ValueError(f"{_fmt(value)} must be <= {_fmt(cap)}")
        return value

    return AfterValidator(check)
