"""ONNX Runtime runners with pre-allocated I/O bindings (torch-free).

``OrtKVRunner`` runs a graph with a KV cache (``base.onnx``, ``hydra_prefix.onnx``), driven by its
contract spec. It owns one token-major cache per KV layer ``[max_context, 1, kv_heads, head_dim]``. Each
call binds ``past_*`` to the view ``cache[:past]`` and the graph's ``new_*`` outputs straight into
``cache[past:past + q]``: no concatenation or allocation per step. ``commit`` moves only the accepted
tree rows that are out of place and advances ``past``; ``rollback`` moves the integer back.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from spectrt.runtime.artifact import Artifact
from spectrt.runtime.contract import BASE, HYDRA_PREFIX, MODEL_DTYPE, GraphSpec, io_mismatch
from spectrt.runtime.errors import ArtifactError, SpectrtError

CPU_PROVIDER = "cpu"  # the one provider whose verify rows cost about as much as a decode step's share each
PROVIDERS = {
    CPU_PROVIDER: "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
DEFAULT_PROVIDER = CPU_PROVIDER
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)", "bool": "tensor(bool)"}


class ContextFull(SpectrtError):
    """A call would write past the KV cache's max context."""


class SessionFromOnnx:
    """Lazy loader: an ``onnxruntime.InferenceSession`` for a graph file, created only when called.

    ``spin``: let idle intra-op threads busy-wait for the next call. Right for the one big graph called
    back to back; wrong for the small draft graphs, whose spinning threads would steal the cores the
    base graph needs next (a decode step alternates between several sessions).
    """

    def __init__(self, path, provider: str = DEFAULT_PROVIDER, threads: int | None = None, spin: bool = True):
        if provider not in PROVIDERS:
            raise SpectrtError(f"unknown provider '{provider}' (choose from {', '.join(PROVIDERS)})")
        self.path, self.provider, self.threads, self.spin = str(path), provider, threads, spin

    def __call__(self):
        import onnxruntime as ort

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


def check_session(session, graph: str, spec: GraphSpec, dims: dict, dtype: str) -> None:
    """The graph's inputs/outputs must be its contract ``spec``'s (``Artifact.spec``: names, ranks, fixed dims,
    dtypes; an optional output may be absent)."""
    ins, outs = spec.expand(dims)
    for kind, specs, actual in (("input", ins, session.get_inputs()), ("output", outs, session.get_outputs())):
        got = {a.name: a for a in actual}
        missing, extra = io_mismatch(specs, got)
        if missing or extra:
            raise ArtifactError(f"{graph}.onnx: {kind}s differ from the I/O contract (missing {missing[:3]}, "
                                f"extra {extra[:3]})")
        for s in specs:
            if s.name not in got:
                continue
            shape, dt = s.resolve(dims, dtype)
            a = got[s.name]
            if a.type != ORT_TYPES[dt] or len(a.shape) != len(shape) or any(
                    isinstance(e, int) and isinstance(x, int) and e != x for e, x in zip(shape, a.shape)):
                raise ArtifactError(f"{graph}.onnx: {kind} '{s.name}' is {a.type}{a.shape}, contract wants {dt}{list(shape)}")


@dataclass
class BaseOutputs:
    """Views into the runner's output buffers for the last call (valid until the next call)."""

    greedy_ids: np.ndarray  # [q] int64
    hidden_states: np.ndarray  # [q, H]
    logits: np.ndarray | None  # [q, V]; None from a runner told not to copy them (copy_logits False)


def check_rows(rows, q: int) -> list[int]:
    """Accepted rows of the last call: strictly increasing indices in 0..q-1 (a root path of the tree)."""
    rows = [int(r) for r in rows]
    if any(not 0 <= r < q for r in rows) or any(b <= a for a, b in zip(rows, rows[1:])):
        raise SpectrtError(f"commit: rows must be strictly increasing indices into the last call's {q} tokens, got {rows}")
    return rows


class OrtKVRunner:
    """A contract graph with a KV cache (``base`` or ``hydra_prefix``) at batch 1. Use inside ``with``.

    ``run(**inputs)`` binds the q new tokens' inputs (``[q, ...]`` arrays, copied into pre-allocated buffers),
    ``past_*`` to ``cache[:past]`` and ``new_*`` into ``cache[past:past+q]`` (token-major layout), or the
    whole head-major cache as both ``cache_*`` and ``present_*`` with ``past_length`` (in-place layout); it
    returns ``[q, ...]`` views of the outputs, valid until the next call.
    """

    def __init__(self, artifact: Artifact, graph: str, max_q: int, provider: str = DEFAULT_PROVIDER,
                 max_context: int | None = None, threads: int | None = None, spin: bool = True,
                 pad_single: bool = False, spare_slots: int = 0):
        if max_q < 1:
            raise SpectrtError(f"max_q must be >= 1, got {max_q}")
        self.artifact, self.graph, self.spec = artifact, graph, artifact.spec(graph)
        self.in_place = artifact.graph(graph).kv_layout == "in-place"  # one head-major buffer, input and output
        self.dims = artifact.dims(graph)
        self.max_q = max_q
        self.max_context = min(max_context or artifact.max_context, artifact.max_context)
        self.pad_single = pad_single  # run q = 1 as q = 2 (see _padded)
        self.spare_slots = spare_slots  # cache slots past max_context the graph itself writes (attention's dummy row)
        self.loader = SessionFromOnnx(artifact.graph_path(graph), provider, threads, spin)
        self.session = self.binding = None
        self.past = 0
        self._last_q = 0

    def _buffer(self, spec) -> np.ndarray:
        """A flat buffer for one non-KV tensor at q = max_q (batch 1)."""
        shape, dt = spec.resolve({**self.dims, "batch": 1, "q": max(self.max_q, 2 if self.pad_single else 1)},
                                 self.artifact.dtype)
        return np.zeros(int(np.prod(shape)), np.dtype(dt))

    def __enter__(self):
        self.session = self.loader()
        check_session(self.session, self.graph, self.spec, self.dims, self.artifact.dtype)
        rows = self.max_context + max(int(self.pad_single), self.spare_slots)  # + a dummy row's slot
        kvh, hd = self.dims["kv_heads"], self.dims["head_dim"]
        kv = (1, kvh, rows, hd) if self.in_place else (rows, 1, kvh, hd)
        layers = self.spec.num_kv_layers(self.dims)
        self.keys = [np.zeros(kv, self.artifact.dtype) for _ in range(layers)]
        self.values = [np.zeros(kv, self.artifact.dtype) for _ in range(layers)]
        self.inputs = {s.name: self._buffer(s) for s in self.spec.inputs}
        self.outputs = {s.name: self._buffer(s) for s in self.spec.outputs}
        self.binding = self.session.io_binding()
        self._shaped, self._bound_rows = {}, 0  # row count -> shaped views; the row count now bound
        for i, (k, v) in enumerate(zip(self.keys, self.values) if self.in_place else ()):
            for name, c in ((f"key.{i}", k), (f"value.{i}", v)):  # the whole buffer, as input and as output
                self._bind(f"cache_{name}", c)
                self._bind(f"present_{name}", c, output=True)
        self.past = 0
        return self

    def __exit__(self, *exc):
        self.session = self.binding = None
        self.keys = self.values = []
        return False

    def _bind(self, name: str, arr: np.ndarray, output: bool = False) -> None:
        bind = self.binding.bind_output if output else self.binding.bind_input
        bind(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

    def _view(self, buffers: dict, spec, q: int) -> np.ndarray:
        shape, _ = spec.resolve({**self.dims, "batch": 1, "q": q}, MODEL_DTYPE)
        return buffers[spec.name][:int(np.prod(shape))].reshape(shape)

    def _views(self, rows: int) -> tuple[dict, dict]:
        """The input and output buffers shaped for a call of ``rows`` rows (made once per row count)."""
        if rows not in self._shaped:
            self._shaped[rows] = ({s.name: self._view(self.inputs, s, rows) for s in self.spec.inputs},
                                  {s.name: self._view(self.outputs, s, rows) for s in self.spec.outputs})
        return self._shaped[rows]

    def _padded(self, spec, arr: np.ndarray) -> np.ndarray:
        """A one-token input as two rows: the token again, seeing only itself (a ``[q, q]`` mask gets a new
        row and column, False except their diagonal). Graphs whose kernels take another code path for one
        row than for several (matmulnbits exports: int4 MatMulNBits, GroupQueryAttention; ``WeightsInfo.row_pad``)
        then compute a decode step exactly
        as a row of a tree pass; the real row never sees the dummy (its column is masked: trailing masked
        keys change no bits), and the dummy's KV lands past the tokens and is never committed."""
        if spec.shape[1:3] == ("q", "q"):
            out = np.eye(2, dtype=arr.dtype)
            out[0, 0] = arr[0, 0]
            return out
        return np.concatenate([arr, arr[-1:]])

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        q = len(inputs[self.spec.inputs[0].name])
        if not 1 <= q <= self.max_q:
            raise SpectrtError(f"{self.graph} call with {q} tokens; this runner was sized for 1..{self.max_q}")
        if self.past + q > self.max_context:
            raise ContextFull(f"context limit reached: {self.past} + {q} tokens > max context {self.max_context}")
        p, pad = self.past, self.pad_single and q == 1
        rows = q + pad
        if self.in_place:
            inputs = {**inputs, "past_length": np.int64(p)}
        ins, outs = self._views(rows)
        rebind = rows != self._bound_rows  # same row count as the last call: same buffers, still bound
        for s in self.spec.inputs:
            arr = np.asarray(inputs[s.name])
            ins[s.name][0] = self._padded(s, arr) if pad and "q" in s.shape else arr
            if rebind:
                self._bind(s.name, ins[s.name])
        for i, (k, v) in enumerate(zip(self.keys, self.values) if not self.in_place else ()):  # in-place: bound once
            self._bind(f"past_key.{i}", k[:p])
            self._bind(f"past_value.{i}", v[:p])
            self._bind(f"new_key.{i}", k[p:p + rows], output=True)
            self._bind(f"new_value.{i}", v[p:p + rows], output=True)
        if rebind:
            for name, view in outs.items():
                self._bind(name, view, output=True)
            self._bound_rows = rows
        self.session.run_with_iobinding(self.binding)
        self._last_q = q
        return {name: view[0][:q] for name, view in outs.items()}

    def commit(self, rows) -> None:
        """Keep the new tokens at ``rows`` (increasing indices into the last call) as the next past."""
        p = self.past
        for i, r in enumerate(check_rows(rows, self._last_q)):
            if r != i:  # only out-of-place accepted rows move
                for cache in (self.keys, self.values):
                    for c in cache:
                        if self.in_place:  # [1, kv_heads, rows, head_dim]
                            c[:, :, p + i] = c[:, :, p + r]
                        else:  # [rows, 1, kv_heads, head_dim]
                            c[p + i] = c[p + r]
        self.past = p + len(rows)
        self._last_q = 0

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` committed tokens (their KV rows are overwritten by the next call)."""
        if not 0 <= n <= self.past:
            raise SpectrtError(f"rollback of {n} tokens with {self.past} in the cache")
        self.past -= n

    def reset(self) -> None:
        self.past = 0
        self._last_q = 0


class OrtBaseRunner(OrtKVRunner):
    """``base.onnx``: token ids in; greedy ids, final-norm hidden states and logits out."""

    copy_logits = True  # the logits land in a bound host buffer either way: there is no copy to skip

    def __init__(self, artifact: Artifact, max_q: int, provider: str = DEFAULT_PROVIDER,
                 max_context: int | None = None, threads: int | None = None):
        w = artifact.manifest.weights
        super().__init__(artifact, BASE.name, max_q, provider, max_context, threads, spin=True,
                         pad_single=w is not None and w.row_pad, spare_slots=int(w is not None and w.attention_pad))
        self.probe = w is not None and w.row_pad and w.attention_pad  # maybe one-row calls are exact here

    def __enter__(self):
        super().__enter__()
        if self.probe:
            self.pad_single = not self.one_row_exact()
        return self

    def one_row_exact(self) -> bool:
        """Whether this CPU's kernels compute a one-token call bit for bit as row 0 of a two-token call (the
        logits of a decode step and of a tree pass's root), probed on fixed tokens after a short prefix.

        The graph gives attention its own dummy row (``WeightsInfo.attention_pad``); what is left is MatMulNBits,
        whose one-row kernel rounds like its several-row kernel on some CPUs (measured: AVX-512 VNNI) and not on
        others (AVX2). MLAS picks a kernel by row count and CPU, never by the data, and any rounding difference
        reaches the logits through int8 activations and every layer, so one probe decides for the session:
        exact, one-token calls run as one row; else the runner keeps padding them (``_padded``)."""
        return self.one_row_gap() == 0.0

    def one_row_gap(self) -> float:
        """max |logits of a one-token call - logits of row 0 of a two-token call| on the probe's fixed tokens
        (``one_row_exact``), the one-token call unpadded whatever this runner's setting; NaN if either is NaN."""
        pad, self.pad_single = self.pad_single, False
        try:
            vocab = self.dims["vocab"]
            prefix = np.arange(1, 5) % vocab
            self.forward(prefix, np.arange(4), np.tri(4, dtype=bool))
            self.commit(range(4))
            one = self.forward(np.array([5 % vocab]), np.array([4]), np.ones((1, 1), bool)).logits[0].copy()
            two = self.forward(np.array([5 % vocab, 6 % vocab]), np.array([4, 5]), np.tri(2, dtype=bool)).logits[0]
            return float(np.abs(one.astype(np.float64) - two).max())
        finally:
            self.pad_single = pad
            self.reset()

    def forward(self, input_ids, position_ids, tree_mask) -> BaseOutputs:
        """Run q new tokens after the current past; their KV lands in cache[past:past+q] (not committed)."""
        out = self.run(input_ids=input_ids, position_ids=position_ids, tree_mask=tree_mask)
        return BaseOutputs(out["greedy_ids"], out["hidden_states"], out["logits"])


class OrtPrefixRunner(OrtKVRunner):
    """``hydra_prefix.onnx`` (Hydra++): base hidden states in, prefix-layer context states out."""

    def __init__(self, artifact: Artifact, max_q: int, provider: str = DEFAULT_PROVIDER,
                 max_context: int | None = None, threads: int | None = None):
        super().__init__(artifact, HYDRA_PREFIX.name, max_q, provider, max_context, threads, spin=False)

    def forward(self, hidden_states, position_ids, tree_mask) -> np.ndarray:
        """Context states [q, H] (a view, valid until the next call); new KV in cache[past:past+q]."""
        return self.run(hidden_states=hidden_states, position_ids=position_ids, tree_mask=tree_mask)["context"]


class OrtGraphRunner:
    """A small stateless graph (heads, draft LM heads) with outputs bound to pre-allocated buffers."""

    def __init__(self, artifact: Artifact, graph: str, max_batch: int, provider: str = DEFAULT_PROVIDER,
                 threads: int | None = None):
        self.artifact, self.graph, self.max_batch = artifact, graph, max_batch
        self.dims = artifact.dims(graph)
        self.loader = SessionFromOnnx(artifact.graph_path(graph), provider, threads, spin=False)
        self.spec = artifact.spec(graph)

    def __enter__(self):
        self.session = self.loader()
        check_session(self.session, self.graph, self.spec, self.dims, self.artifact.dtype)
        self.binding = self.session.io_binding()
        self.outputs = {}
        have = {o.name for o in self.session.get_outputs()}
        for s in self.spec.outputs:
            if s.name in have:  # an optional output older exports lack is not bound
                shape, dt = s.resolve({**self.dims, "batch": self.max_batch}, self.artifact.dtype)
                self.outputs[s.name] = np.zeros(shape, np.dtype(dt))
        return self

    def has_output(self, name: str) -> bool:
        """True when the graph has this output (inside ``with``; optional outputs may be absent)."""
        return name in self.outputs

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


__all__ = ["OrtKVRunner", "OrtBaseRunner", "OrtPrefixRunner", "OrtGraphRunner", "SessionFromOnnx", "ContextFull",
           "BaseOutputs", "PROVIDERS", "DEFAULT_PROVIDER", "check_rows", "check_session"]
