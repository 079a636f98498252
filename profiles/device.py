"""Device profiles (``spectrt devices``): what a target GPU can hold and run, as YAML next to this file.

A profile bounds every dynamic dim of the I/O contract (``batch``, ``q``, ``past``) for one device, so
the TensorRT optimization profiles, the runner's buffers and the memory estimate all come from here
plus the contract plus the artifact's model dims. Users may pass their own YAML path anywhere a
profile name is accepted; ``base: NAME`` in a user YAML inherits a built-in profile's values.

Loading imports only pyyaml; nothing here touches torch, TensorRT or CUDA.
"""
from __future__ import annotations

import os

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from spectrt.runtime.engines import parse_version
from spectrt.runtime.errors import SpectrtError

PROFILE_DIR = Path(__file__).resolve().parent

# Precisions spectrt knows how to ask TensorRT for. "quantized" ones need a Q/DQ graph.
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "fp4")
QUANTIZED_PRECISIONS = ("int8", "fp8", "fp4")
DEVICES = ("jetson", "desktop")


class ProfileError(SpectrtError):
    """A device profile is missing, malformed or does not fit the artifact."""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    device: str  # jetson | desktop
    compute_capability: str  # "8.7"
    tensorrt: str  # oldest TensorRT the device ships (JetPack 6 -> 10.3); `check` targets it
    precisions: tuple  # what the hardware runs fast, best first
    default_precision: str
    memory_budget_mb: int  # model + KV cache + activations + workspace
    max_context: int  # tokens in the KV cache (capped by the artifact's max_context)
    opt_context: int  # past length TensorRT tunes kernels for
    max_tree_nodes: int  # q of a verify call
    opt_tree_nodes: int
    max_prefill_chunk: int  # q of a prefill call
    max_frontier: int  # batch of the heads / draft_lm_head graphs
    max_batch: int  # batch of the base graph (the runtime uses 1)
    workspace_mb: int  # TensorRT builder workspace pool limit
    builder_optimization_level: int  # 0..5 (TensorRT default 3)
    # the roofline of `spectrt calibrate tree --profile` (optional keys: a profile without them has no roofline)
    memory_bandwidth_gbs: float | None = None  # DRAM peak, GB/s
    peak_fp16_tflops: float | None = None  # dense fp16 tensor-core peak, TFLOP/s
    source: str = ""  # where it was loaded from (not a YAML key)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["precisions"] = list(self.precisions)
        return d

    def describe(self) -> str:
        width = max(len(f.name) for f in fields(self))
        lines = [f"{k:<{width}}  {', '.join(v) if isinstance(v, (list, tuple)) else v}"
                 for k, v in self.to_dict().items()]
        return "\n".join(lines)


_INT_FIELDS = {
    # key: (min, max) inclusive
    "memory_budget_mb": (256, 1 << 22),
    "max_context": (16, 1 << 20),
    "opt_context": (0, 1 << 20),
    "max_tree_nodes": (1, 4096),
    "opt_tree_nodes": (1, 4096),
    "max_prefill_chunk": (1, 1 << 16),
    "max_frontier": (1, 4096),
    "max_batch": (1, 256),
    "workspace_mb": (16, 1 << 20),
    "builder_optimization_level": (0, 5),
}
_FLOAT_FIELDS = {"memory_bandwidth_gbs": (0.1, 1e5), "peak_fp16_tflops": (0.01, 1e5)}  # optional keys: (min, max)
_STR_FIELDS = ("name", "description", "device", "compute_capability", "tensorrt", "default_precision")
_KEYS = tuple(f.name for f in fields(DeviceProfile) if f.name != "source")


def list_profiles() -> list[str]:
    """Names of the built-in profiles (the YAML files shipped in this package), sorted."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | os.PathLike | DeviceProfile) -> DeviceProfile:
    """A built-in profile by name, or a user YAML by path; raises ProfileError with a one-line reason."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    raw, source = _read(name_or_path)
    return _validate(_resolve_base(raw, source, seen=(source,)), source)


def _read(name_or_path) -> tuple[dict, str]:
    import yaml

    s = str(name_or_path)
    path = Path(s)
    if not (path.suffix in (".yaml", ".yml") or os.sep in s or "/" in s):
        path = PROFILE_DIR / f"{s}.yaml"
        if not path.is_file():
            raise ProfileError(f"unknown device profile '{s}' (built-in: {', '.join(list_profiles())}; "
                               "or pass the path of a YAML file)")
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ProfileError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: a profile must be a YAML mapping of key: value")
    return raw, str(path)


def _resolve_base(raw: dict, source: str, seen: tuple) -> dict:
    base = raw.get("base")
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ProfileError(f"{source}: base: must be a profile name or path, got {base!r}")
    parent, psource = _read(base)
    if psource in seen:
        raise ProfileError(f"{source}: base: cycle through {psource}")
    merged = dict(_resolve_base(parent, psource, seen + (psource,)))
    merged.pop("base", None)
    merged.update({k: v for k, v in raw.items() if k != "base"})
    return merged


def _validate(raw: dict, source: str) -> DeviceProfile:
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ProfileError(f"{source}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(_KEYS)}, base)")
    missing = [k for k in _KEYS if k not in raw and k not in _FLOAT_FIELDS]
    if missing:
        raise ProfileError(f"{source}: missing key(s) {', '.join(missing)}")
    values = {}
    for k in _STR_FIELDS:
        v = raw[k]
        if isinstance(v, (int, float)) and k in ("compute_capability", "tensorrt"):
            v = str(v)  # YAML reads 8.7 as a float
        if not isinstance(v, str) or not v:
            raise ProfileError(f"{source}: {k}: expected a non-empty string, got {v!r}")
        values[k] = v
    for k, (lo, hi) in _INT_FIELDS.items():
        v = raw[k]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ProfileError(f"{source}: {k}: expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ProfileError(f"{source}: {k}: {v} is out of range [{lo}, {hi}]")
        values[k] = v
    for k, (lo, hi) in _FLOAT_FIELDS.items():
        v = raw.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi):
            raise ProfileError(f"{source}: {k}: expected a number in [{lo:g}, {hi:g}], got {v!r}")
        values[k] = None if v is None else float(v)
    if values["device"] not in DEVICES:
        raise ProfileError(f"{source}: device: '{values['device']}' is not one of {', '.join(DEVICES)}")
    for k in ("compute_capability", "tensorrt"):
        if not _is_version(values[k]):
            raise ProfileError(f"{source}: {k}: '{values[k]}' is not a version like 8.7")
    if parse_version(values["tensorrt"]) < (10,):
        raise ProfileError(f"{source}: tensorrt: spectrt needs TensorRT 10.x or newer, got {values['tensorrt']}")
    precisions = raw["precisions"]
    if not isinstance(precisions, list) or not precisions:
        raise ProfileError(f"{source}: precisions: expected a non-empty list, e.g. [fp16, fp32]")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ProfileError(f"{source}: precisions: unknown {', '.join(map(str, bad))} (known: {', '.join(PRECISIONS)})")
    if values["default_precision"] not in precisions:
        raise ProfileError(f"{source}: default_precision: '{values['default_precision']}' is not in precisions")
    for opt, mx in (("opt_context", "max_context"), ("opt_tree_nodes", "max_tree_nodes"),
                    ("max_prefill_chunk", "max_context"), ("max_tree_nodes", "max_context")):
        if values[opt] > values[mx]:
            raise ProfileError(f"{source}: {opt} ({values[opt]}) must be <= {mx} ({values[mx]})")
    return DeviceProfile(precisions=tuple(precisions), source=source, **values)


def _is_version(s: str) -> bool:
    parts = s.split(".")
    return 1 <= len(parts) <= 4 and all(p.isdigit() for p in parts)
