"""`spectrt profile`: time every graph of an artifact at the contract's shapes.

KV graphs (base, hydra_prefix): prefill chunks (past 0) and, for base, the verify-cost curve: q = 1, 2, 4, ...
at a few past lengths, how much a bigger draft tree costs, the number speculative decoding lives on (the
prefix layer gets small causal "observe" calls instead: it only ever sees committed tokens). Stateless
graphs (heads, draft LM heads, hydra heads): a few frontier batch sizes. Feeds are random but valid, built
from the contract: token ids < vocab, a causal (prefill) or random-tree (verify) mask, positions past +
depth, zero KV.

Backends:
  * ``ort``: Polygraphy's ``OnnxrtRunner`` (CUDA provider when onnxruntime-gpu has it); the past KV is fed
    from the host, as ONNX Runtime without I/O binding does.
  * ``trt``: spectrt's own TensorRT runners, i.e. what ``generate --backend trt`` runs: KV cache resident on
    the device, the optimization profile picked per call (decode for verify-sized q, prefill for chunks),
    only the inputs copied in and greedy ids + hidden states copied out (no logits, as in generate). Timed
    wall-clock around each synchronized call.
"""
from __future__ import annotations

import io
import json
import shlex
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from spectrt.profiles.device import ProfileError, load_profile
from spectrt.profiles.shapes import effective_max_context
from spectrt.runtime.artifact import atomic_write, load_artifact
from spectrt.runtime.contract import BASE, DEFAULT_PREFILL_CHUNK, KV_LAYOUTS, graph_spec
from spectrt.runtime.engines import engine_path, resolve_profile
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.trt_runner import TrtGraphRunner, TrtKVRunner

VERIFY_Q_MAX = 64  # the verify curve goes q = 1, 2, 4, ..., 64 (capped by the profile's tree size)
OBSERVE_Q = (1, 2, 4)  # prefix-layer calls after a step: the accepted path
FRONTIER_BATCHES = (1, 4, 16)


# --------------------------------------------------------------------------------------------------
# feeds from the contract


def random_tree_mask(q: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """[q, q] ancestor-or-self mask of a random tree whose node i has a parent < i; depth per node."""
    parent = [-1] + [int(rng.integers(0, i)) for i in range(1, q)]
    mask = np.zeros((q, q), dtype=bool)
    depth = np.zeros(q, dtype=np.int64)
    for i in range(q):
        mask[i, i] = True
        if parent[i] >= 0:
            mask[i] |= mask[parent[i]]
            depth[i] = depth[parent[i]] + 1
    return mask, depth


def kv_feeds(graph: str, dims: dict, dtype: str, q: int, past: int, phase: str, rng,
             kv_layout: str = KV_LAYOUTS[0]) -> dict:
    """Valid inputs of a KV graph (base, hydra_prefix) for q new tokens after ``past`` cached ones (batch 1).
    ``phase``: "verify" uses a random tree mask, anything else a causal one. An in-place cache gets room
    for exactly the new rows (its ``present_*`` outputs are then separate buffers: ORT copies the past)."""
    if phase == "verify":
        mask, depth = random_tree_mask(q, rng)
    else:
        mask, depth = np.tril(np.ones((q, q), dtype=bool)), np.arange(q, dtype=np.int64)
    spec = graph_spec(graph, kv_layout)
    ins, _ = spec.expand(dims)
    feeds = {}
    for s in ins:
        shape, dt = s.resolve({**dims, "batch": 1, "q": q, "past": past, "capacity": past + q}, dtype)
        if s.name == "input_ids":
            feeds[s.name] = rng.integers(0, dims["vocab"], size=shape, dtype=np.int64)
        elif s.name == "position_ids":
            feeds[s.name] = (past + depth).astype(np.int64)[None]
        elif s.name == "tree_mask":
            feeds[s.name] = mask[None]
        elif s.name.startswith(("past_key", "past_value", "cache_")):
            feeds[s.name] = np.zeros(shape, dtype=dt)
        elif s.name == "past_length":
            feeds[s.name] = np.array([past], dtype=np.int64)
        else:
            feeds[s.name] = rng.standard_normal(shape).astype(dt)
    return feeds


def base_feeds(dims: dict, dtype: str, q: int, past: int, phase: str, rng) -> dict:
    """Valid inputs of the base graph for q new tokens after ``past`` cached ones (batch 1)."""
    return kv_feeds(BASE.name, dims, dtype, q, past, phase, rng)


def graph_feeds(graph: str, dims: dict, dtype: str, batch: int, rng) -> dict:
    """Random inputs of a stateless graph at ``batch``."""
    out = {}
    for s in graph_spec(graph).inputs:
        shape, dt = s.resolve(dict(dims, batch=batch), dtype)
        out[s.name] = rng.standard_normal(shape).astype(dt)
    return out


def shape_points(dims: dict, max_context: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 max_tree_nodes: int = VERIFY_Q_MAX, max_frontier: int = max(FRONTIER_BATCHES)) -> dict:
    """Which shapes to time: prefill lengths, verify q values and past lengths, frontier batches."""
    chunk = max(1, min(prefill_chunk, max_context))
    prefill = sorted({1, max(1, chunk // 4), max(1, chunk // 2), chunk})
    q_max = max(1, min(VERIFY_Q_MAX, max_tree_nodes, max_context // 2))
    verify_q = [1 << i for i in range(q_max.bit_length()) if (1 << i) <= q_max]
    pasts = sorted({p for p in (max_context // 8, max_context // 2, max_context - verify_q[-1]) if p >= 1})
    frontier = [b for b in FRONTIER_BATCHES if b <= max_frontier] or [1]
    return {"prefill_q": prefill, "verify_q": verify_q, "verify_past": pasts, "frontier_batch": frontier}


# --------------------------------------------------------------------------------------------------
# backends: ``open(graph)`` yields (call, limits); call(feeds, past) -> seconds of one run


Call = Callable[[dict, int], float]


def _time(call: Call, feeds: dict, past: int, iterations: int, warmup: int) -> dict:
    for _ in range(warmup):
        call(feeds, past)
    ms = sorted(call(feeds, past) * 1e3 for _ in range(iterations))
    return {"median_ms": round(statistics.median(ms), 4), "mean_ms": round(statistics.fmean(ms), 4),
            "min_ms": round(ms[0], 4), "p90_ms": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 4)}


class _OrtBackend:
    name = "ort"

    def __init__(self, art):
        import onnxruntime as ort

        self.art = art
        self.providers = ["cuda", "cpu"] if "CUDAExecutionProvider" in ort.get_available_providers() else ["cpu"]

    @contextmanager
    def open(self, graph: str) -> Iterator[tuple[Call, dict | None]]:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        with OnnxrtRunner(SessionFromOnnx(str(self.art.graph_path(graph)), providers=self.providers)) as runner:
            def call(feeds: dict, past: int) -> float:
                runner.infer(feeds)
                return float(runner.last_inference_time())

            yield call, None

    def model_path(self, graph: str) -> str:
        return str(self.art.graph_path(graph))

    def polygraphy_flags(self) -> list:
        return ["--onnxrt"] + (["--providers", *self.providers] if self.providers != ["cpu"] else [])


class _TrtBackend:
    name = "trt"

    def __init__(self, art, profile):
        self.art = art
        first = BASE.name if art.has_graph(BASE.name) else next(iter(art.manifest.graphs))
        self.profile = resolve_profile(art, first, profile)

    @contextmanager
    def open(self, graph: str) -> Iterator[tuple[Call, dict | None]]:
        """The runner ``generate`` would use; limits: the largest q/past or batch its engine takes."""
        spec = graph_spec(graph)
        if spec.per_layer_inputs:
            skip = ("logits",) if graph == BASE.name else ()
            with TrtKVRunner(self.art, graph, self.profile, skip=skip) as kv:
                def call(feeds: dict, past: int) -> float:
                    kv.past = past  # timing only: the cache rows' content does not change the cost
                    t0 = time.perf_counter()
                    kv.run(**{s.name: feeds[s.name][0] for s in spec.inputs})
                    return time.perf_counter() - t0

                yield call, {"q": kv.max_q, "context": kv.max_context}
        else:
            with TrtGraphRunner(self.art, graph, self.profile) as runner:
                def call(feeds: dict, past: int) -> float:
                    t0 = time.perf_counter()
                    runner(**feeds)
                    return time.perf_counter() - t0

                yield call, {"batch": runner.max_batch}

    def model_path(self, graph: str) -> str:
        return str(engine_path(self.art.root, graph, self.profile))

    def polygraphy_flags(self) -> list:
        return ["--trt", "--model-type", "engine"]


def _fits(limits: dict | None, n: int, past: int, kv: bool) -> bool:
    if limits is None:
        return True
    return n <= limits["q"] and past + n <= limits["context"] if kv else n <= limits["batch"]


def polygraphy_command(backend, graph: str, feeds: dict, iterations: int, warmup: int, vocab: int | None) -> str:
    shapes = [f"{k}:[{','.join(str(d) for d in v.shape)}]" for k, v in feeds.items()]
    args = ["polygraphy", "run", backend.model_path(graph), *backend.polygraphy_flags(), "--input-shapes", *shapes]
    if vocab and "input_ids" in feeds:
        args += ["--val-range", f"input_ids:[0,{vocab - 1}]"]
    args += ["--warm-up", str(warmup), "--iterations", str(iterations)]
    return " ".join(shlex.quote(a) for a in args)


def _work(graph: str, dims: dict, ctx: int, prof) -> list[tuple[str, int, int]]:
    """(phase, q or batch, past) points of one graph."""
    if not graph_spec(graph).per_layer_inputs:
        pts = shape_points(dims, ctx, max_frontier=prof.max_frontier if prof else max(FRONTIER_BATCHES))
        return [("frontier", b, 0) for b in pts["frontier_batch"]]
    pts = shape_points(dims, ctx, prof.max_prefill_chunk if prof else DEFAULT_PREFILL_CHUNK,
                       prof.max_tree_nodes if prof else VERIFY_Q_MAX)
    work = [("prefill", q, 0) for q in pts["prefill_q"]]
    if graph == BASE.name:
        return work + [("verify", q, p) for p in pts["verify_past"] for q in pts["verify_q"] if p + q <= ctx]
    return work + [("observe", q, p) for p in pts["verify_past"] for q in OBSERVE_Q if p + q <= ctx]


def profile_artifact(root, backend: str = "ort", iterations: int = 20, warmup: int = 3, profile=None,
                     graphs: list | None = None, seed: int = 0, progress=print) -> dict:
    """Time the artifact's graphs; returns the result dict written by ``--json``.

    ``profile``: a device profile (name, YAML path or DeviceProfile): bounds the shapes, and for ``trt``
    picks the engines (by the profile's name).
    """
    if iterations < 1 or warmup < 0:
        raise SpectrtError("--iterations must be >= 1 and --warmup >= 0")
    art = load_artifact(root)
    rng = np.random.default_rng(seed)
    prof = load_profile(profile) if profile is not None else None
    be: _OrtBackend | _TrtBackend
    if backend == "ort":
        be = _OrtBackend(art)
    elif backend == "trt":
        be = _TrtBackend(art, prof)
        if prof is None:
            try:
                prof = load_profile(be.profile)
            except ProfileError:  # a custom profile's YAML is not at hand: the engines' own limits apply
                pass
    else:
        raise SpectrtError(f"unknown backend '{backend}' (ort, trt)")
    ctx = effective_max_context(prof, art.max_context) if prof else art.max_context
    names = list(graphs or art.manifest.graphs)
    unknown = [g for g in names if not art.has_graph(g)]
    if unknown:
        raise SpectrtError(f"{art.root}: no graph(s) {', '.join(unknown)} (have: {', '.join(art.manifest.graphs)})")
    result: dict = {"artifact": str(art.root), "backend": be.name, "profile": be.profile if isinstance(be, _TrtBackend) else prof.name if prof else None,
                    "iterations": iterations, "warmup": warmup, "dtype": art.dtype, "max_context": ctx, "points": [],
                    "commands": [], "verify_curve": None}
    if isinstance(be, _OrtBackend):
        result["providers"] = be.providers
    for g in names:
        dims, kv = art.dims(g), bool(graph_spec(g).per_layer_inputs)
        work = _work(g, dims, ctx, prof)
        progress(f"{g}: {len(work)} shapes x {iterations} iterations ({be.name})")
        feeds = None
        with be.open(g) as (call, limits):
            for phase, n, past in work:
                if not _fits(limits, n, past, kv):
                    progress(f"  skipped {g} {phase} n={n} past={past}: outside the engine's optimization profiles")
                    continue
                if kv:
                    feeds = kv_feeds(g, dims, art.dtype, n, past, phase, rng, art.graph(g).kv_layout)
                    point = {"graph": g, "phase": phase, "q": n, "past": past, "batch": 1}
                else:
                    feeds = graph_feeds(g, dims, art.dtype, n, rng)
                    point = {"graph": g, "phase": phase, "batch": n}
                point.update(_time(call, feeds, past, iterations, warmup))
                result["points"].append(point)
        if feeds is not None:
            result["commands"].append(polygraphy_command(be, g, feeds, iterations, warmup, dims.get("vocab")))
    verify = [p for p in result["points"] if p["graph"] == BASE.name and p["phase"] == "verify"]
    if verify:
        qs = sorted({p["q"] for p in verify})
        series = []
        for past in sorted({p["past"] for p in verify}):
            by_q = {p["q"]: p["median_ms"] for p in verify if p["past"] == past}
            series.append({"past": past, "median_ms": [by_q.get(q) for q in qs]})
        result["verify_curve"] = {"q": qs, "series": series}
    return result


# --------------------------------------------------------------------------------------------------
# output


def format_table(result: dict) -> str:
    lines = [f"{'graph':<14} {'phase':<9} {'q/batch':>8} {'past':>6} {'median ms':>10} {'p90 ms':>9} {'min ms':>9}"]
    for p in result["points"]:
        n = p.get("q", p.get("batch"))
        lines.append(f"{p['graph']:<14} {p['phase']:<9} {n:>8} {p.get('past', ''):>6} {p['median_ms']:>10.3f} "
                     f"{p['p90_ms']:>9.3f} {p['min_ms']:>9.3f}")
    curve = result.get("verify_curve")
    if curve:
        lines.append("")
        lines.append("verify cost (median ms) vs tree size q:")
        lines.append(f"{'past':>8} " + " ".join(f"{'q=' + str(q):>8}" for q in curve["q"]))
        for s in curve["series"]:
            lines.append(f"{s['past']:>8} " + " ".join(f"{v:>8.3f}" if v is not None else f"{'-':>8}"
                                                      for v in s["median_ms"]))
    return "\n".join(lines)


def write_json(result: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def plot_verify_curve(result: dict, path) -> Path:
    """PNG of verify latency vs q, one line per past length (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result.get("verify_curve")
    if not curve:
        raise SpectrtError("no verify timings to plot (the artifact has no base graph?)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for s in curve["series"]:
        pts = [(q, v) for q, v in zip(curve["q"], s["median_ms"]) if v is not None]
        ax.plot([q for q, _ in pts], [v for _, v in pts], marker="o", label=f"past={s['past']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(curve["q"], [str(q) for q in curve["q"]])
    ax.set_xlabel("tree nodes verified per call (q)")
    ax.set_ylabel("median latency (ms)")
    title = f"verify cost, {result['backend']}"
    if result.get("profile"):
        title += f", {result['profile']}"
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic_write(path, png.getbuffer())
    return path


__all__ = ["random_tree_mask", "kv_feeds", "base_feeds", "graph_feeds", "shape_points", "profile_artifact", "format_table",
           "write_json", "plot_verify_curve", "polygraphy_command"]
