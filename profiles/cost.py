"""What one decoding step costs on a device, in milliseconds: the verify call of q tree nodes after ``past``
cached tokens, and the draft graphs' calls. For `spectrt calibrate tree`.

Two sources:

* ``MeasuredCost``: the timings of `spectrt profile --json` (the verify-cost curve and the draft graphs'
  frontier points), interpolated; measured on the device the export runs on.
* ``RooflineCost``: an estimate for a device profile from the host: bytes moved and FLOPs of each call
  against the profile's memory bandwidth and fp16 peak, at fixed efficiencies (``max(bytes / bandwidth,
  FLOPs / peak)``, no launch overhead). It ranks tree sizes; it is no prediction of absolute speed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spectrt.profiles.device import DeviceProfile, ProfileError, load_profile
from spectrt.profiles.memory import DTYPE_BYTES
from spectrt.runtime.artifact import Artifact
from spectrt.runtime.contract import graph_spec
from spectrt.runtime.errors import SpectrtError

BANDWIDTH_EFFICIENCY = 0.7  # share of the datasheet DRAM bandwidth a decode step reaches
COMPUTE_EFFICIENCY = 0.5  # share of the dense tensor-core peak large-q GEMMs reach
PEAK_SCALE = {"fp32": 0.25, "fp16": 1.0, "bf16": 1.0, "int8": 2.0, "fp8": 2.0, "fp4": 4.0}  # x the fp16 peak


def _interp(x: float, xs, ys) -> float:
    """Piecewise-linear through (xs, ys) (xs increasing): clamped on the left, extended on the right along
    the last segment (a cost keeps growing past the last measured point)."""
    if len(xs) == 1 or x <= xs[-1]:
        return float(np.interp(x, xs, ys))
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return float(ys[-1] + max(slope, 0.0) * (x - xs[-1]))


class MeasuredCost:
    """Step costs from a `spectrt profile --json` result (or the same dict in memory)."""

    kind = "measured"

    def __init__(self, result: dict, source: str):
        self.source = source
        self.profile = result.get("profile") if isinstance(result.get("profile"), str) else None
        curve: Any = result.get("verify_curve")  # checked by the lookups below
        try:
            qs = [int(q) for q in curve["q"]]
            self._series = []  # (past, qs, ms) with the points that were measured
            for s in curve["series"]:
                pts = [(q, float(ms)) for q, ms in zip(qs, s["median_ms"]) if ms is not None]
                if pts:
                    self._series.append((int(s["past"]), [q for q, _ in pts], [ms for _, ms in pts]))
            self._series.sort()
            self._graphs: dict[str, tuple[list, list]] = {}
            self._observe: list = []
            for p in result.get("points", []):
                if p["phase"] == "frontier":
                    xs, ys = self._graphs.setdefault(p["graph"], ([], []))
                    xs.append(int(p["batch"]))
                    ys.append(float(p["median_ms"]))
                elif p["phase"] == "observe":
                    self._observe.append((int(p["past"]), int(p["q"]), float(p["median_ms"])))
        except (TypeError, KeyError, ValueError):
            raise SpectrtError(f"{source}: not the JSON of `spectrt profile --json` (no verify_curve with q and "
                               "series of median_ms)") from None
        if not self._series:
            raise SpectrtError(f"{source}: no verify timings of the base graph; run `spectrt profile DIR --json OUT` "
                               "with the base graph")
        for name, (xs, ys) in self._graphs.items():
            order = np.argsort(xs)
            self._graphs[name] = ([xs[i] for i in order], [ys[i] for i in order])
        self.max_q = max(qs[-1] for _, qs, _ in self._series)

    @classmethod
    def load(cls, path) -> "MeasuredCost":
        path = Path(path)
        try:
            result = json.loads(path.read_text())
        except FileNotFoundError:
            raise SpectrtError(f"{path}: no such timings file (make one with `spectrt profile DIR --json {path}`)") \
                from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SpectrtError(f"{path}: cannot read the timings JSON ({e.__class__.__name__}: {e})") from None
        if not isinstance(result, dict):
            raise SpectrtError(f"{path}: not the JSON of `spectrt profile --json` (expected an object)")
        return cls(result, str(path))

    def check_graphs(self, names) -> None:
        """Every draft graph the export runs must have frontier timings."""
        missing = [g for g in names if not graph_spec(g).per_layer_inputs and g not in self._graphs]
        if missing:
            raise SpectrtError(f"{self.source}: no timings of graph(s) {', '.join(missing)}; profile all of the "
                               "export's graphs (`spectrt profile DIR --json OUT` without --graphs)")

    def verify_ms(self, q: int, past: int) -> float:
        pasts = [p for p, _, _ in self._series]
        at = [_interp(q, qs, ms) for _, qs, ms in self._series]
        return float(np.interp(past, pasts, at))

    def graph_ms(self, graph: str, batch: int) -> float:
        xs, ys = self._graphs[graph]
        return _interp(batch, xs, ys)

    def observe_ms(self, q: int, past: int) -> float:
        """The Hydra++ prefix layer over q committed tokens (0 without observe timings)."""
        if not self._observe:
            return 0.0
        nearest = min(self._observe, key=lambda o: abs(o[0] - past))[0]
        pts = sorted((n, ms) for p, n, ms in self._observe if p == nearest)
        return _interp(q, [n for n, _ in pts], [ms for _, ms in pts])


@dataclass(frozen=True)
class _Bytes:
    """Per-element bytes of one export running at one engine precision."""

    weight: float  # float weights of the graphs
    base_layers: float  # the base's decoder-layer weights (quantized ones as they are)
    lm_head: float
    kv: float
    activation: float


class RooflineCost:
    """Step costs estimated for a device profile from the export's sizes: ``max(bytes / bandwidth, FLOPs /
    peak)`` per call at BANDWIDTH_EFFICIENCY and COMPUTE_EFFICIENCY."""

    kind = "roofline"

    def __init__(self, art: Artifact, profile: DeviceProfile | str):
        self.art, self.device = art, load_profile(profile)
        p = self.device
        if p.memory_bandwidth_gbs is None or p.peak_fp16_tflops is None:
            raise ProfileError(f"{p.source}: no memory_bandwidth_gbs/peak_fp16_tflops, so no roofline; add them to "
                               "the profile's YAML, or pass --timings from `spectrt profile --json` on the device")
        self.source, self.profile = p.name, p.name
        self.max_q = p.max_tree_nodes
        precision = p.default_precision
        elt = DTYPE_BYTES[art.dtype]
        weight = elt if precision == "fp32" else min(elt, DTYPE_BYTES[precision])
        q = art.manifest.weights
        layers = q.element_bytes() if q is not None else weight
        self.b = _Bytes(weight, layers, q.element_bytes(vocab=True) if q is not None and q.lm_head else weight,
                        kv=elt if precision == "fp32" else min(elt, 2), activation=min(elt, 4))
        self.bandwidth = p.memory_bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY  # bytes/s
        self.flops = p.peak_fp16_tflops * 1e12 * PEAK_SCALE.get(precision, 1.0) * COMPUTE_EFFICIENCY  # FLOP/s

    def _ms(self, nbytes: float, flops: float) -> float:
        return 1e3 * max(nbytes / self.bandwidth, flops / self.flops)

    def _layers(self, m) -> tuple[int, int]:
        """(decoder-layer weights, LM-head weights) of the base, in elements."""
        attn = m.hidden * m.head_dim * (2 * m.num_heads + 2 * m.kv_heads)  # q, o, k, v projections
        return m.num_layers * (attn + 3 * m.hidden * m.intermediate), m.vocab * m.hidden

    def verify_ms(self, q: int, past: int) -> float:
        m, b = self.art.model, self.b
        layers, lm = self._layers(m)
        kv = 2 * m.num_layers * m.kv_heads * m.head_dim * (past + q) * b.kv  # read the past, write q rows
        nbytes = layers * b.base_layers + lm * b.lm_head + kv + q * m.vocab * b.activation  # + the logits
        flops = 2 * (layers + lm) * q + 4 * m.num_layers * m.num_heads * m.head_dim * q * (past + q)
        return self._ms(nbytes, flops)

    def graph_ms(self, graph: str, batch: int) -> float:
        """A stateless draft graph: its weights read once, 2 FLOPs per weight and batch row."""
        weights = self.art.graph(graph).bytes / DTYPE_BYTES[self.art.dtype]  # elements (file bytes ~ weights)
        return self._ms(weights * self.b.weight, 2 * weights * batch)

    def observe_ms(self, q: int, past: int) -> float:
        """The Hydra++ prefix layer (one decoder layer) over q committed tokens."""
        m = self.art.model
        weights = self.art.graph("hydra_prefix").bytes / DTYPE_BYTES[self.art.dtype]
        kv = 2 * m.kv_heads * m.head_dim * (past + q) * self.b.kv
        return self._ms(weights * self.b.weight + kv, 2 * weights * q)

    def check_graphs(self, names) -> None:
        pass


def step_cost(art: Artifact, timings=None, profile=None, measure=None):
    """The cost model of one calibration: ``timings`` (a profile JSON path), ``profile`` (a device profile:
    roofline), or ``measure()`` (a profile result measured now) when neither is given."""
    if timings is not None and profile is not None:
        raise SpectrtError("--timings and --profile are two sources of the same costs; pass one")
    cost: MeasuredCost | RooflineCost
    if timings is not None:
        cost = MeasuredCost.load(timings)
    elif profile is not None:
        cost = RooflineCost(art, profile)
    else:
        cost = MeasuredCost(measure(), "measured here (ort)")
    cost.check_graphs(art.manifest.graphs)
    return cost


__all__ = ["MeasuredCost", "RooflineCost", "step_cost", "BANDWIDTH_EFFICIENCY", "COMPUTE_EFFICIENCY"]
