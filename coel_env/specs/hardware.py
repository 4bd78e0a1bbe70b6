"""Devices (vendor peaks) and the hardware profile: every physics constant the surrogate uses.

A profile lives in `conf/hardware/<name>.yaml`; `experiments.calibrate` writes new ones from measurements.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coel_env.errors import ConfigError, format_pydantic_error
from coel_env.specs.bounds import (
    MAX_GB,
    MAX_GBS,
    MAX_OVERSUBSCRIPTION_EXPONENT,
    MAX_ROW_HEADER_BYTES,
    MAX_SECONDS,
    MAX_SLOWDOWN,
    MAX_TFLOPS,
    MAX_WATTS,
    Float,
    Int,
    at_most,
)
from coel_env.specs.model import BIT_WIDTHS

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class DeviceSpec(BaseModel):
    """One accelerator (or a CPU socket) with vendor peak numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    memory_gb: Annotated[Float, at_most(MAX_GB)] = Field(gt=0)
    mem_bw_gbs: Annotated[Float, at_most(MAX_GBS)] = Field(gt=0, description="memory bandwidth, GB/s")
    peak_tflops: Annotated[Float, at_most(MAX_TFLOPS)] = Field(gt=0, description="dense bf16 peak, TFLOP/s")
    power_idle_w: Annotated[Float, at_most(MAX_WATTS)] = Field(ge=0)
    power_max_w: Annotated[Float, at_most(MAX_WATTS)] = Field(gt=0)

    @model_validator(mode="after")
    def _check(self) -> DeviceSpec:
        if self.power_idle_w > self.power_max_w:
            raise ValueError(f"power_idle_w ({self.power_idle_w:g}) must be <= power_max_w ({self.power_max_w:g})")
        return self


DEVICE_PRESETS: dict[str, dict] = {
    "rtx4090d": dict(memory_gb=24, mem_bw_gbs=1008, peak_tflops=147, power_idle_w=25, power_max_w=425),
    "rtx4090": dict(memory_gb=24, mem_bw_gbs=1008, peak_tflops=165, power_idle_w=25, power_max_w=450),
    "jetson-agx-orin": dict(memory_gb=64, mem_bw_gbs=204.8, peak_tflops=21, power_idle_w=15, power_max_w=60),
    "a100-80gb": dict(memory_gb=80, mem_bw_gbs=2039, peak_tflops=312, power_idle_w=60, power_max_w=400),
    "h100-sxm": dict(memory_gb=80, mem_bw_gbs=3350, peak_tflops=989, power_idle_w=70, power_max_w=700),
    "h200": dict(memory_gb=141, mem_bw_gbs=4800, peak_tflops=989, power_idle_w=70, power_max_w=700),
    # CPU sockets (expert compute on the CPU, Fiddler-style)
    "i9-14900kf": dict(memory_gb=64, mem_bw_gbs=89.6, peak_tflops=2.0, power_idle_w=10, power_max_w=253),
    "xeon-edge": dict(memory_gb=32, mem_bw_gbs=60, peak_tflops=1.2, power_idle_w=15, power_max_w=150),
    "arm-a78ae": dict(memory_gb=64, mem_bw_gbs=204.8, peak_tflops=0.3, power_idle_w=2, power_max_w=10),
    "cpu-small": dict(memory_gb=8, mem_bw_gbs=20, peak_tflops=0.2, power_idle_w=5, power_max_w=35),
}


def device_preset(name: str) -> DeviceSpec:
    key = name.lower()
    if key not in DEVICE_PRESETS:
        raise ConfigError(f"device: unknown preset '{name}'; allowed: {', '.join(DEVICE_PRESETS)}")
    return DeviceSpec(name=key, **DEVICE_PRESETS[key])


def resolve_device(value: str | dict | DeviceSpec) -> DeviceSpec:
    if isinstance(value, DeviceSpec):
        return value
    if isinstance(value, dict):
        value = dict(value)
        base = {}
        if "preset" in value:
            base = device_preset(str(value.pop("preset"))).model_dump()
        return spec_from_mapping(DeviceSpec, {**base, **value}, "device")
    return device_preset(str(value))


class QualityModel(BaseModel):
    """Quality loss constants (fraction of accuracy lost); calibrated from real-backend KL/top-1 measurements."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    loss_per_bits: dict[Int, Float] = Field(default_factory=lambda: {16: 0.0, 8: 0.002, 4: 0.02})
    prune_linear: Float = Field(0.005, ge=0, description="loss per unit prune ratio below the knee")
    prune_knee: Float = Field(0.5, gt=0, le=1)
    prune_quadratic: Float = Field(0.4, ge=0, description="loss per (ratio - knee)^2 above the knee")
    fusion_loss: Float = Field(0.004, ge=0, description="loss per unit fused fraction")
    fusion_fraction: Float = Field(0.25, ge=0, lt=1, description="tokens merged by fusion on a link")

    @field_validator("loss_per_bits")
    @classmethod
    def _losses(cls, v: dict[int, float]) -> dict[int, float]:
        _check_bits(v)
        bad = {b: x for b, x in v.items() if not 0 <= x <= 1}
        if bad:
            raise ValueError(f"{bad} must be fractions of accuracy lost, in [0, 1]")
        return v


def _check_bits(table: dict[int, float]) -> None:
    """Keys of a per-bit-width table must be supported bit-widths."""
    unknown = sorted(set(table) - set(BIT_WIDTHS))
    if unknown:
        raise ValueError(f"bit-widths {unknown} are not supported; allowed: {', '.join(map(str, BIT_WIDTHS))}")


class DeviceOverride(BaseModel):
    """Measured numbers replacing a device preset's vendor peaks (e.g. a CPU "GPU" running under gloo)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mem_bw_gbs: Annotated[Float | None, at_most(MAX_GBS)] = Field(
        None, gt=0, description="measured memory bandwidth, GB/s"
    )
    peak_tflops: Annotated[Float | None, at_most(MAX_TFLOPS)] = Field(None, gt=0, description="measured dense TFLOP/s")


class HardwareProfile(BaseModel):
    """Every physics constant of the surrogate. Defaults are public-spec estimates; calibration refines them."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = "default"
    source: str = "vendor specs and public measurements (uncalibrated)"
    compute_efficiency: Float = Field(0.55, gt=0, le=1, description="achievable fraction of peak FLOP/s")
    memory_efficiency: Float = Field(0.80, gt=0, le=1, description="achievable fraction of memory bandwidth")
    link_efficiency: Float = Field(0.94, gt=0, le=1, description="goodput fraction of a network link")
    pcie_efficiency: Float = Field(0.80, gt=0, le=1)
    layer_overhead_s: Annotated[Float, at_most(MAX_SECONDS)] = Field(
        25e-6, ge=0, description="kernel launches etc. per layer per step"
    )
    prefill_layer_overhead_s: Annotated[Float, at_most(MAX_SECONDS)] | None = Field(
        None,
        ge=0,
        description="per layer of a step that runs a prefill, when it differs from a decode step's (engines replay "
        "decode steps from CUDA graphs and run prefill eagerly); None: layer_overhead_s",
    )
    expert_overhead_s: Annotated[Float, at_most(MAX_SECONDS)] = Field(
        4e-6, ge=0, description="per activated expert per step"
    )
    ungrouped_layer_overhead_s: Annotated[Float, at_most(MAX_SECONDS)] = Field(
        0.0,
        ge=0,
        description="per step, per layer where some GPU computes its experts one by one (not all in GPU memory at "
        "grouped_expert_bits): the real backend's per-expert path syncs with the host to sort the rows by expert",
    )
    shared_gpu_handoff_s: Annotated[Float, at_most(MAX_SECONDS)] = Field(
        0.0,
        ge=0,
        description="lock-step serving on a rig whose server processes share one GPU (the one-GPU calibration "
        "machine): per step, per MoE layer and per hand-off of the GPU to another live server's process (one for "
        "its turn at the layer's exchange, one more when it has requests of its own)",
    )
    grouped_expert_bits: list[Literal[16, 8, 4]] = Field(
        default_factory=list,
        description="bit-widths whose experts a GPU computes with one grouped kernel per layer (vLLM/SGLang fused "
        "MoE: all; the real backend's fast path: 16) when every expert it holds in that layer is in its memory at "
        "one of them: no per-expert fixed cost; otherwise every use pays expert_overhead_s",
    )
    dequant_slowdown: dict[Int, Float] = Field(
        default_factory=lambda: {16: 1.0, 8: 1.05, 4: 1.15}, description="time multiplier of low-bit kernels"
    )
    prefetch_hit_rate: Float = Field(0.6, ge=0, le=1, description="next-layer predictor hit rate")
    cpu_compute: bool = Field(True, description="may run CPU-resident experts on the CPU (Fiddler)")
    kv_reserve_frac: Float = Field(
        0.10, ge=0, lt=1, description="share of GPU memory a plan must leave for KV cache (experts may not use it)"
    )
    gpu_memory_utilization: Float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of GPU memory the engine uses for weights and KV cache (vLLM's gpu_memory_utilization, "
        "0.9 there); the rest is activations and runtime",
    )
    cpu_reserve_gb: Annotated[Float, at_most(MAX_GB)] = Field(
        8.0, ge=0, description="host RAM kept for the OS and the runtime"
    )
    transfer_latency_s: Annotated[Float, at_most(MAX_SECONDS)] = Field(
        50e-6, ge=0, description="software latency per message (α)"
    )
    allreduce_latency_s: Annotated[Float, at_most(MAX_SECONDS)] = Field(
        20e-6,
        ge=0,
        description="fixed seconds of one small all-reduce among a server's GPUs (tensor parallel, over PCIe; an "
        "assumption of the order NCCL's small-message latency on PCIe GPUs, not a fit); coel_env/backend/parallel.py",
    )
    emulated_latency: bool = Field(
        False,
        description="link latency is emulated by the application (the real "
        "backend's shaper), which hides the per-message software cost: a round trip "
        "takes 2 max(latency, α) instead of 2 (latency + α)",
    )
    serving: Literal["independent", "lockstep", "continuous"] = Field(
        "independent",
        description="independent: servers step on their own (one batch estimate, M/D/1 queueing); continuous: "
        "continuous batching per server as vLLM/SGLang serve (the batch is the fixed point of Little's law under "
        "the KV-cache and max_batch limits, admission queueing, chunked prefill); lockstep: the real backend, "
        "continuous batching in max_batch KV slots whose steps are coupled as expert parallelism couples them "
        "(every live server runs each step and all meet at each MoE layer)",
    )
    host_cores: Int | None = Field(
        None,
        ge=1,
        description="all servers are processes sharing one host with this "
        "many cores (the CPU/gloo real backend); None: each server has its own hardware",
    )
    oversubscription_exponent: Annotated[Float, at_most(MAX_OVERSUBSCRIPTION_EXPONENT)] = Field(
        1.0,
        ge=0,
        description="with more live servers P than host_cores C, every step takes (P / C) ** this longer (fitted)",
    )
    routing: Literal["load_aware", "local_first"] = Field(
        "load_aware", description="replica choice: least added layer time, or own replica first (real backend)"
    )
    activation_bytes: Int = Field(
        2,
        ge=1,
        le=4,
        description="bytes per hidden-state element on the wire (2: bf16 on GPUs; 4: the CPU backend's fp32)",
    )
    row_header_bytes: Annotated[Int, at_most(MAX_ROW_HEADER_BYTES)] = Field(
        8,
        ge=0,
        description="bytes per expert slot of a dispatched row (top_k slots per row; the real dispatcher's "
        "int32 expert id and fp32 gate weight: 8; coel_env/backend/wire.py)",
    )
    cloud_bandwidth_gbps: Annotated[Float, at_most(MAX_GBS)] = Field(
        0.1, gt=0, description="WAN to the checkpoint store"
    )
    cloud_latency_s: Annotated[Float, at_most(MAX_SECONDS)] = Field(0.05, ge=0)
    quality: QualityModel = Field(default_factory=QualityModel)
    device_overrides: dict[str, DeviceOverride] = Field(
        default_factory=dict, description="device name (preset) -> measured numbers; applied by build_cluster"
    )
    pcie_bw_gbs: Annotated[Float | None, at_most(MAX_GBS)] = Field(
        None, gt=0, description="measured host->device copy GB/s (overrides scenarios)"
    )
    ssd_bw_gbs: Annotated[Float | None, at_most(MAX_GBS)] = Field(
        None, gt=0, description="measured SSD read GB/s (overrides scenarios)"
    )

    @field_validator("dequant_slowdown")
    @classmethod
    def _slowdown(cls, v: dict[int, float]) -> dict[int, float]:
        _check_bits(v)
        bad = {b: x for b, x in v.items() if not 0 < x <= MAX_SLOWDOWN}
        if bad:
            raise ValueError(f"{bad} must be time multipliers in (0, {MAX_SLOWDOWN:g}]")
        return v

    @property
    def prefill_layer_overhead(self) -> float:
        """Seconds per layer of a step that runs a prefill (`prefill_layer_overhead_s`, else `layer_overhead_s`)."""
        return self.layer_overhead_s if self.prefill_layer_overhead_s is None else self.prefill_layer_overhead_s

    def device(self, spec: DeviceSpec) -> DeviceSpec:
        """`spec` with this profile's measured numbers for its name, if any."""
        o = self.device_overrides.get(spec.name)
        if o is None:
            return spec
        return spec.model_copy(update={k: v for k, v in o.model_dump().items() if v is not None})


def read_yaml(path: Path, label: str):
    """The YAML document in file `path`; a one-line ConfigError starting with `label` if it is not UTF-8 text or not
    valid YAML (the one way scenario and hardware files are read)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        bad = f"byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
        raise ConfigError(f"{label}: not UTF-8 text ({bad})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot be read ({exc.strerror or exc})") from None


S = TypeVar("S", bound=BaseModel)


def spec_from_mapping(spec: type[S], data, source: str) -> S:
    """`data` validated as the spec class `spec`; a one-line ConfigError starting with `source` if it is not a
    mapping or a field is bad (the one way scenario and hardware mappings become specs)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return spec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_pydantic_error(source, exc, spec)) from None


def hardware_profile_names() -> list[str]:
    """Names of the shipped (and calibrated) profiles: `conf/hardware/*.yaml`."""
    return sorted(p.stem for p in (CONF_DIR / "hardware").glob("*.yaml"))


def unknown_profile(name: object) -> ConfigError:
    """The one-line error for a profile name that is not in `conf/hardware`."""
    return ConfigError(f"hardware: unknown profile '{name}'; allowed: {', '.join(hardware_profile_names())}")


def load_hardware_profile(
    name_or_path: str | Path | dict | HardwareProfile | None = None, source: str = "hardware"
) -> HardwareProfile:
    """A profile by name (`conf/hardware/<name>.yaml`), path, dict or instance; None gives the defaults.

    `source` starts the error message of a bad dict (e.g. the Hydra option it came from)."""
    if name_or_path is None:
        return HardwareProfile()
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    if isinstance(name_or_path, dict):
        data = name_or_path
    else:
        path = Path(name_or_path)
        if not path.suffix:
            path = CONF_DIR / "hardware" / f"{name_or_path}.yaml"
        if not path.is_file():
            raise unknown_profile(name_or_path)
        data = read_yaml(path, f"hardware: {path}") or {}
        source = f"hardware profile {path.name}"
    return spec_from_mapping(HardwareProfile, data, source)
