"""ONNX Runtime runners with pre-allocated I/O bindings (torch-free).

``OrtBaseRunner`` owns one token-major KV cache per layer ``[max_context, 1, kv_heads, head_dim]``. Each
call binds ``past_*`` to the view ``cache[:past]`` and the graph's ``new_*`` outputs straight into
``cache[past:past + q]``: no concatenation or allocation per step. ``commit`` moves only the accepted
tree rows that are out of place and advances ``past``; rollback is just not advancing it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from spectrt.runtime.contract import BASE, graph_spec, model_dims
from spectrt.runtime.errors import ArtifactError, SpectrtError
from spectrt.runtime.manifest import Artifact

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
DEFAULT_PROVIDER = "cpu"


class ContextFull(SpectrtError):
    """A call would write past the KV cache's max context."""


class SessionFromOnnx:
    """Lazy loader: an ``onnxruntime.InferenceSession`` for a graph file, created only when called.

    ``spin``: let idle intra-op threads busy-wait for the next call. Right for the one big graph called
    back to back; wrong for the small draft graphs, whose spinning threads would steal the cores the
    base graph needs next (a decode step alternates between several sessions).
    """

    def __init__(self, path, provider: str = DEFAULT_PROVIDER, threads: int | None = None, spin: bool = True):
        self.path, self.provider, self.threads, self.spin = str(path), provider, threads, spin

    def __call__(self):
        import onnxruntime as ort

        if self.provider not in PROVIDERS:
            raise SpectrtError(f"unknown provider '{self.provider}' (choose from {', '.join(PROVIDERS)})")
        ep = PROVIDERS[self.provider]
        if ep not in ort.get_available_providers():
            raise SpectrtError(f"onnxruntime here has no {ep}; install onnxruntime-gpu for CUDA/TensorRT providers")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads or os.cpu_count() or 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        opts.log_severity_level = 3
        try:
            return ort.InferenceSession(self.path, opts, providers=[ep])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ArtifactError(f"{self.path}: onnxruntime cannot load the graph ({str(e).splitlines()[0]})") from None


def check_session(session, graph: str, dims: dict, dtype: str, num_layers: int = 0) -> None:
    """The graph's inputs/outputs must be exactly the contract's (names, ranks, fixed dims, dtypes)."""
    ins, outs = graph_spec(graph).expand(num_layers)
    ort_types = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
                 "bool": "tensor(bool)"}
    for kind, specs, actual in (("input", ins, session.get_inputs()), ("output", outs, session.get_outputs())):
        got = {a.name: a for a in actual}
        if set(got) != {s.name for s in specs}:
            missing = sorted({s.name for s in specs} - set(got))[:3]
            extra = sorted(set(got) - {s.name for s in specs})[:3]
            raise ArtifactError(f"{graph}.onnx: {kind}s differ from the I/O contract (missing {missing}, extra {extra})")
        for s in specs:
            shape, dt = s.resolve(dims, dtype)
            a = got[s.name]
            if a.type != ort_types[dt] or len(a.shape) != len(shape) or any(
                    isinstance(e, int) and isinstance(x, int) and e != x for e, x in zip(shape, a.shape)):
                raise ArtifactError(f"{graph}.onnx: {kind} '{s.name}' is {a.type}{a.shape}, contract wants {dt}{list(shape)}")


@dataclass
class BaseOutputs:
    """Views into the runner's output buffers for the last call (valid until the next call)."""

    greedy_ids: np.ndarray  # [q] int64
    hidden_states: np.ndarray  # [q, H]
    logits: np.ndarray  # [q, V]


class OrtBaseRunner:
    """Runs ``base.onnx`` at batch 1 with a position-indexed static KV cache. Use inside ``with``."""

    def __init__(self, artifact: Artifact, max_q: int, provider: str = DEFAULT_PROVIDER,
                 max_context: int | None = None, threads: int | None = None):
        self.artifact = artifact
        self.dims = model_dims(artifact.model)
        self.max_q = max_q
        self.max_context = min(max_context or artifact.max_context, artifact.max_context)
        self.loader = SessionFromOnnx(artifact.graph_path("base"), provider, threads)
        self.session = None
        self.past = 0

    def __enter__(self):
        d, np_dtype = self.dims, np.dtype(self.artifact.dtype)
        self.session = self.loader()
        check_session(self.session, "base", d, self.artifact.dtype, d["num_layers"])
        kv = (self.max_context, 1, d["kv_heads"], d["head_dim"])
        self.keys = [np.zeros(kv, np_dtype) for _ in range(d["num_layers"])]
        self.values = [np.zeros(kv, np_dtype) for _ in range(d["num_layers"])]
        self.ids = np.zeros(self.max_q, np.int64)
        self.pos = np.zeros(self.max_q, np.int64)
        self.mask = np.zeros(self.max_q * self.max_q, np.bool_)
        self.out_logits = np.zeros(self.max_q * d["vocab"], np_dtype)
        self.out_hidden = np.zeros(self.max_q * d["hidden"], np_dtype)
        self.out_greedy = np.zeros(self.max_q, np.int64)
        self.binding = self.session.io_binding()
        self.past = 0
        return self

    def __exit__(self, *exc):
        self.session = self.binding = None
        self.keys = self.values = []
        return False

    def _bind(self, name: str, arr: np.ndarray, output: bool = False) -> None:
        bind = self.binding.bind_output if output else self.binding.bind_input
        bind(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

    def forward(self, input_ids, position_ids, tree_mask) -> BaseOutputs:
        """Run q new tokens after the current past; their KV lands in cache[past:past+q] (not committed)."""
        q = len(input_ids)
        if not 1 <= q <= self.max_q:
            raise SpectrtError(f"base call with {q} tokens; this runner was sized for 1..{self.max_q}")
        if self.past + q > self.max_context:
            raise ContextFull(f"context limit reached: {self.past} + {q} tokens > max context {self.max_context}")
        p, d = self.past, self.dims
        ids, pos, mask = self.ids[:q], self.pos[:q], self.mask[:q * q].reshape(q, q)
        ids[:], pos[:], mask[:] = input_ids, position_ids, tree_mask
        self._bind("input_ids", ids.reshape(1, q))
        self._bind("position_ids", pos.reshape(1, q))
        self._bind("tree_mask", mask.reshape(1, q, q))
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            self._bind(f"past_key.{i}", k[:p])
            self._bind(f"past_value.{i}", v[:p])
            self._bind(f"new_key.{i}", k[p:p + q], output=True)
            self._bind(f"new_value.{i}", v[p:p + q], output=True)
        out = BaseOutputs(self.out_greedy[:q], self.out_hidden[:q * d["hidden"]].reshape(q, d["hidden"]),
                          self.out_logits[:q * d["vocab"]].reshape(q, d["vocab"]))
        self._bind("greedy_ids", out.greedy_ids.reshape(1, q), output=True)
        self._bind("hidden_states", out.hidden_states.reshape(1, q, d["hidden"]), output=True)
        self._bind("logits", out.logits.reshape(1, q, d["vocab"]), output=True)
        self.session.run_with_iobinding(self.binding)
        return out

    def commit(self, rows) -> None:
        """Keep the new tokens at ``rows`` (increasing indices into the last call) as the next past."""
        p = self.past
        for i, r in enumerate(rows):
            if r != i:  # only out-of-place accepted rows move
                for cache in (self.keys, self.values):
                    for c in cache:
                        c[p + i] = c[p + r]
        self.past = p + len(rows)

    def reset(self) -> None:
        self.past = 0


class OrtGraphRunner:
    """A small stateless graph (heads, draft LM head) with outputs bound to pre-allocated buffers."""

    def __init__(self, artifact: Artifact, graph: str, max_batch: int, provider: str = DEFAULT_PROVIDER,
                 threads: int | None = None):
        self.artifact, self.graph, self.max_batch = artifact, graph, max_batch
        self.dims = {**model_dims(artifact.model), **artifact.manifest.get("draft", {}).get("dims", {})}
        self.loader = SessionFromOnnx(artifact.graph_path(graph), provider, threads, spin=False)
        self.spec = graph_spec(graph)

    def __enter__(self):
        self.session = self.loader()
        check_session(self.session, self.graph, self.dims, self.artifact.dtype)
        self.binding = self.session.io_binding()
        self.outputs = {}
        for s in self.spec.outputs:
            shape, dt = s.resolve({**self.dims, "batch": self.max_batch}, self.artifact.dtype)
            self.outputs[s.name] = np.zeros(shape, np.dtype(dt))
        return self

    def __exit__(self, *exc):
        self.session = self.binding = None
        return False

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        b = next(iter(inputs.values())).shape[0]
        if not 1 <= b <= self.max_batch:
            raise SpectrtError(f"{self.graph}: batch {b} outside 1..{self.max_batch}")
        keep = {name: np.ascontiguousarray(arr) for name, arr in inputs.items()}  # alive until run returns
        for name, arr in keep.items():
            self.binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        views = {}
        for name, buf in self.outputs.items():
            v = buf[:b]
            self.binding.bind_output(name, "cpu", 0, v.dtype, list(v.shape), v.ctypes.data)
            views[name] = v
        self.session.run_with_iobinding(self.binding)
        return views


__all__ = ["OrtBaseRunner", "OrtGraphRunner", "SessionFromOnnx", "ContextFull", "BaseOutputs", "PROVIDERS",
           "DEFAULT_PROVIDER", "BASE"]
