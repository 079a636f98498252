"""`spectrt profile`: time every graph of an artifact at the contract's shapes with Polygraphy runners.

base: prefill chunks (past 0) and the verify-cost curve, q = 1, 2, 4, ... at a few past lengths: how much
a bigger draft tree costs, the number speculative decoding lives on. heads / draft_lm_head: a few
frontier batch sizes. Feeds are random but valid, built from the contract: token ids < vocab, a causal
(prefill) or random-tree (verify) mask, positions past + depth, zero KV.

Backends: ``ort`` (``OnnxrtRunner(SessionFromOnnx(path))``, CUDA provider when onnxruntime-gpu has it)
and ``trt`` (``TrtRunner`` over the engines of ``spectrt build``, one runner per optimization profile).
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
from pathlib import Path

import numpy as np

from spectrt.runtime.contract import BASE, DEFAULT_PREFILL_CHUNK, graph_spec, has_spec
from spectrt.runtime.errors import SpectrtError

VERIFY_Q_MAX = 64  # the verify curve goes q = 1, 2, 4, ..., 64 (capped by the profile's tree size)
FRONTIER_BATCHES = (1, 4, 16)


# --------------------------------------------------------------------------------------------------
# feeds from the contract


def random_tree_mask(q: int, rng) -> np.ndarray:
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


def base_feeds(dims: dict, dtype: str, q: int, past: int, phase: str, rng) -> dict:
    """Valid inputs of the base graph for q new tokens after ``past`` cached ones (batch 1)."""
    if phase == "prefill":
        mask = np.tril(np.ones((q, q), dtype=bool))
        depth = np.arange(q, dtype=np.int64)
    else:
        mask, depth = random_tree_mask(q, rng)
    feeds = {
        "input_ids": rng.integers(0, dims["vocab"], size=(1, q), dtype=np.int64),
        "position_ids": (past + depth).astype(np.int64)[None],
        "tree_mask": mask[None],
    }
    kv = np.zeros((past, 1, dims["kv_heads"], dims["head_dim"]), dtype=dtype)
    ins, _ = BASE.expand(int(dims["num_layers"]))
    for s in ins:
        if s.name.startswith("past_"):
            feeds[s.name] = kv
    return feeds


def graph_feeds(graph: str, dims: dict, dtype: str, batch: int, rng) -> dict:
    spec = graph_spec(graph)
    out = {}
    for s in spec.inputs:
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
# runners


def _time(runner, feeds: dict, iterations: int, warmup: int) -> dict:
    for _ in range(warmup):
        runner.infer(feeds)
    ms = []
    for _ in range(iterations):
        runner.infer(feeds)
        ms.append(runner.last_inference_time() * 1e3)
    ms.sort()
    return {"median_ms": round(statistics.median(ms), 4), "mean_ms": round(statistics.fmean(ms), 4),
            "min_ms": round(ms[0], 4), "p90_ms": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 4)}


class _OrtBackend:
    name = "ort"

    def __init__(self, art):
        import onnxruntime as ort

        self.art = art
        self.providers = ["cuda", "cpu"] if "CUDAExecutionProvider" in ort.get_available_providers() else ["cpu"]

    def runners(self, graph: str):
        """[(None, runner)]: one runner that takes any shape."""
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        return [(None, OnnxrtRunner(SessionFromOnnx(str(self.art.graph_path(graph)), providers=self.providers)))]

    def model_path(self, graph: str) -> str:
        return str(self.art.graph_path(graph))

    def polygraphy_flags(self) -> list:
        return ["--onnxrt"] + (["--providers", *self.providers] if self.providers != ["cpu"] else [])


class _TrtBackend:
    name = "trt"

    def __init__(self, art, profile: str | None):
        from spectrt.runtime.trt_runner import _profile_name

        self.art = art
        self.profile = _profile_name(art, BASE.name if art.has_graph(BASE.name) else next(iter(art.manifest["graphs"])),
                                     profile)
        self._engines = {}

    def _engine(self, graph):
        import tensorrt as trt

        from spectrt.profiles.build import load_engine_bytes

        if graph not in self._engines:
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engines[graph] = (runtime, runtime.deserialize_cuda_engine(
                load_engine_bytes(self.art, graph, self.profile)))
        return self._engines[graph][1]

    def runners(self, graph: str):
        """[(dims ranges, runner)] per optimization profile of the engine."""
        from polygraphy.backend.trt import TrtRunner

        from spectrt.profiles.build import engine_name

        rec = self.art.manifest["engines"][engine_name(graph, self.profile)]
        engine = self._engine(graph)
        return [({k: tuple(v) for k, v in p["dims"].items()}, TrtRunner(engine, optimization_profile=i))
                for i, p in enumerate(rec["optimization_profiles"])]

    def model_path(self, graph: str) -> str:
        from spectrt.profiles.build import engine_path

        return str(engine_path(self.art.root, graph, self.profile))

    def polygraphy_flags(self) -> list:
        return ["--trt", "--model-type", "engine"]


def _fits(ranges: dict | None, values: dict) -> bool:
    return ranges is None or all(ranges[k][0] <= v <= ranges[k][2] for k, v in values.items() if k in ranges)


def polygraphy_command(backend, graph: str, feeds: dict, iterations: int, warmup: int, vocab: int | None) -> str:
    shapes = [f"{k}:[{','.join(str(d) for d in v.shape)}]" for k, v in feeds.items()]
    args = ["polygraphy", "run", backend.model_path(graph), *backend.polygraphy_flags(), "--input-shapes", *shapes]
    if vocab and "input_ids" in feeds:
        args += ["--val-range", f"input_ids:[0,{vocab - 1}]"]
    args += ["--warm-up", str(warmup), "--iterations", str(iterations)]
    return " ".join(shlex.quote(a) for a in args)


def profile_artifact(root, backend: str = "ort", iterations: int = 20, warmup: int = 3, profile: str | None = None,
                     graphs: list | None = None, seed: int = 0, progress=print) -> dict:
    """Time the artifact's graphs; returns the result dict written by ``--json``."""
    from spectrt.profiles import effective_max_context, graph_dims, load_profile
    from spectrt.runtime.manifest import load_artifact

    if iterations < 1 or warmup < 0:
        raise SpectrtError("--iterations must be >= 1 and --warmup >= 0")
    art = load_artifact(root)
    rng = np.random.default_rng(seed)
    if backend == "ort":
        be = _OrtBackend(art)
    elif backend == "trt":
        be = _TrtBackend(art, profile)
        profile = be.profile
    else:
        raise SpectrtError(f"unknown backend '{backend}' (ort, trt)")
    prof = load_profile(profile) if profile else None
    ctx = effective_max_context(prof, art.max_context) if prof else art.max_context
    names = graphs or [g for g in art.manifest["graphs"] if has_spec(g)]
    result = {"artifact": str(art.root), "backend": be.name, "profile": profile, "iterations": iterations,
              "warmup": warmup, "dtype": art.dtype, "max_context": ctx, "points": [], "commands": [],
              "verify_curve": None}
    if be.name == "ort":
        result["providers"] = be.providers
    for g in names:
        dims = graph_dims(art, g)
        if g == BASE.name:
            pts = shape_points(dims, ctx, prof.max_prefill_chunk if prof else DEFAULT_PREFILL_CHUNK,
                               prof.max_tree_nodes if prof else VERIFY_Q_MAX)
            work = [("prefill", q, 0) for q in pts["prefill_q"]]
            work += [("verify", q, p) for p in pts["verify_past"] for q in pts["verify_q"] if p + q <= ctx]
        else:
            pts = shape_points(dims, ctx, max_frontier=prof.max_frontier if prof else max(FRONTIER_BATCHES))
            work = [("frontier", b, 0) for b in pts["frontier_batch"]]
        progress(f"{g}: {len(work)} shapes x {iterations} iterations ({be.name})")
        last_feeds = None
        for ranges, runner in be.runners(g):
            todo = [w for w in work if _fits(ranges, {"q": w[1], "past": w[2]} if g == BASE.name else {"batch": w[1]})]
            work = [w for w in work if w not in todo]
            if not todo:
                continue
            with runner:
                for phase, n, past in todo:
                    if g == BASE.name:
                        feeds = base_feeds(dims, art.dtype, n, past, phase, rng)
                        point = {"graph": g, "phase": phase, "q": n, "past": past, "batch": 1}
                    else:
                        feeds = graph_feeds(g, dims, art.dtype, n, rng)
                        point = {"graph": g, "phase": phase, "batch": n}
                    point.update(_time(runner, feeds, iterations, warmup))
                    result["points"].append(point)
                    last_feeds = feeds
        for phase, n, past in work:
            progress(f"  skipped {g} {phase} n={n} past={past}: outside the engine's optimization profiles")
        if last_feeds is not None:
            result["commands"].append(polygraphy_command(be, g, last_feeds, iterations, warmup, dims.get("vocab")))
    verify = [p for p in result["points"] if p["phase"] == "verify"]
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


__all__ = ["random_tree_mask", "base_feeds", "graph_feeds", "shape_points", "profile_artifact", "format_table",
           "write_json", "plot_verify_curve", "polygraphy_command"]
