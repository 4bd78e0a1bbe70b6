"""Limits of the specs, each defined once.

Caps on sizes are checked while a spec is validated, before any array is allocated; caps on physical quantities
keep every product the surrogate forms (bytes, FLOP/s, seconds) finite on its way to the numba kernels. Every cap
is far above the shipped presets: DeepSeek-V3 has 61 layers and 256 experts, the largest scenario (deepseek-scale)
64 servers, no shipped length distribution has a sigma above 0.7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, BeforeValidator

from coel_env.errors import ConfigError

# ---- model sizes -------------------------------------------------------------------------------------------------
MAX_LAYERS = 1024
MAX_EXPERTS = 4096
MAX_D_MODEL = 65536
MAX_D_FF = 1 << 20  # expert, shared and dense MLP widths
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_VOCAB = 1 << 22
MAX_ROUTING_ENTRIES = 1 << 26  # MoE layers x experts^2: the routing generator's inter-layer affinity [L-1, E, E]
MAX_ATTN_PARAMS = 1 << 42  # attention parameters per layer (the largest standard layer: 4 x 65536 x 1024 x 4096)

# ---- scenario sizes ----------------------------------------------------------------------------------------------
MAX_SERVERS = 256
MAX_GPUS_PER_SERVER = 64  # with MAX_SERVERS, device ids stay within the plans' int16
MAX_REPLICAS = 8
MAX_DOMAINS = 256
MAX_BATCH = 65536
MAX_BATCHED_TOKENS = 1 << 20  # tokens per engine step
MAX_KV_BLOCK_TOKENS = 1024
MAX_LENGTH_TOKENS = 1 << 20  # mean input/output length of a request
MAX_POPULARITY_ENTRIES = 1 << 24  # servers (and domains) x MoE layers x experts: popularity arrays [S, L, E]
MAX_ROUTE_ENTRIES = 1 << 24  # server pairs x physical links: the cluster's route matrix [P, K]
MAX_ACTION_ENTRIES = 1 << 26  # an action space's flat mask (MultiDiscrete: sum of nvec) or Box dimensions: the
# `full` space's mask grows as MoE layers x experts x max_replicas x devices (deepseek-scale: 2.1e6), checked when
# the action codec is built (64 MiB of bool per mask)

# ---- physical quantities -----------------------------------------------------------------------------------------
MAX_GB = 1e6  # memory and storage capacities, GB
MAX_GBS = 1e6  # bandwidths: GB/s (memory, PCIe, SSD) or Gb/s (network links)
MAX_TFLOPS = 1e6
MAX_WATTS = 1e6
MAX_SECONDS = 1e6  # latencies (links: in ms, same cap), overheads, epochs, SLOs, budgets, evaluation windows
MIN_SECONDS = 1e-3  # SLOs and latency budgets: rewards divide by them (1 ms is far below any end-to-end latency)
MIN_ENERGY_J = 1.0  # energy budget per epoch: rewards divide by it (an idle CPU socket draws watts)
MAX_ENERGY_J = 1e15
MAX_ARRIVAL_RATE = 1e4  # requests/s per server
MAX_SIGMA = 3.0  # lognormal sigma (request lengths, arrival burstiness)
MAX_UNIFORM_SPREAD = 1.0  # uniform lengths are mean x (1 ± spread): above 1 some would be negative
MAX_ZIPF_ALPHA = 10.0
MAX_SLOWDOWN = 1e4  # time multiplier of low-bit kernels
MAX_OVERSUBSCRIPTION_EXPONENT = 10.0
MAX_ROW_HEADER_BYTES = 1 << 20


def _fmt(x: float) -> str:
    """A number as a person writes it: 100 rather than 100.0, 1e+300 rather than 301 digits."""
    if isinstance(x, int) and abs(x) >= 10**16:
        return f"{float(x):g}" if x.bit_length() < 1000 else f"an integer of ~{int(x.bit_length() * 0.30103)} digits"
    return str(int(x)) if isinstance(x, float) and x.is_integer() and abs(x) < 1e16 else str(x)


def brief(value, show=repr, limit: int = 80) -> str:
    """`value` for a one-line error: `show(value)` when short, else its type (and length); a huge integer by its
    size (never all its digits, which Python may refuse to print)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**16:
        return _fmt(value)
    if isinstance(value, (list, tuple)) and any(isinstance(x, int) and abs(x) >= 10**16 for x in value):
        return f"a {type(value).__name__} of {len(value)} values"
    text = show(value)
    if len(text) <= limit and "\n" not in text:
        return text
    return f"a {type(value).__name__}" + (f" of {len(value)} values" if isinstance(value, (list, tuple)) else "")


def not_bool(value):
    """`value` unless it is a boolean: YAML reads `on`, `yes` and `true` as booleans, which pydantic would take as 1,
    so numeric fields refuse them (ValueError: one line for the spec's error)."""
    if isinstance(value, bool):
        raise ValueError(f"{value} is a boolean (YAML reads on/off, yes/no, true/false as booleans); must be a number")
    return value


Int = Annotated[int, BeforeValidator(not_bool)]  # the type of every integer spec field
Float = Annotated[float, BeforeValidator(not_bool)]  # the type of every real spec field


def at_most(cap: float) -> AfterValidator:
    """A pydantic after-validator refusing a value above `cap` with one line naming both (None passes)."""

    def check(value):
        if value is not None and value > cap:
            raise ValueError(f"{_fmt(value)} must be <= {_fmt(cap)}")
        return value

    return AfterValidator(check)


@dataclass(frozen=True)
class Arg:
    """What a keyword argument checked by hand (a baseline's constructor, a real-backend option) may be: `kind`
    int, float, bool or str (bools are never numbers, strings never numbers), finite and in [low, high]
    (`open_low`: (low, high]), or None too when `optional`."""

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    optional: bool = False

    def allowed(self) -> str:
        what = {int: "an integer", float: "a finite number", bool: "a boolean", str: "a string"}[self.kind]
        if self.low is not None and self.high is not None:
            what += f" in {'(' if self.open_low else '['}{_fmt(self.low)}, {_fmt(self.high)}]"
        elif self.low is not None:
            what += f" {'>' if self.open_low else '>='} {_fmt(self.low)}"
        elif self.high is not None:
            what += f" <= {_fmt(self.high)}"
        return what + (" or null" if self.optional else "")

    def check(self, label: str, value):
        """`value` (an int given for a float becomes a float, a numpy scalar a Python one), else a one-line
        ConfigError `label: <value> given; must be <what is allowed>`."""
        if value is None and self.optional:
            return None
        if isinstance(value, np.generic):
            value = value.item()
        given = value
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind in (int, float):
            ok = number and (self.kind is float or isinstance(value, int))
            if ok and self.kind is float:
                try:
                    value = float(value)
                except OverflowError:  # an int beyond float range
                    ok = False
            ok = (
                ok
                and (self.kind is int or math.isfinite(value))
                and (self.low is None or (value > self.low if self.open_low else value >= self.low))
                and (self.high is None or value <= self.high)
            )
        else:
            ok = isinstance(value, self.kind)
        if not ok:
            raise ConfigError(f"{label}: {brief(given, limit=40)} given; must be {self.allowed()}")
        return value
