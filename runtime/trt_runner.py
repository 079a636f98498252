"""TensorRT runners for the contract's graphs, with the ONNX Runtime runners' interface (torch-free;
tensorrt and polygraphy's CUDA wrapper are imported when a runner is entered).

A runner owns everything it allocates, inside ``with``: the engine, one execution context, one CUDA stream
and its device buffers, all cudaMalloc'd once (so every address is 256-byte aligned, as
``set_tensor_address`` requires, and every I/O tensor has its own non-null address, empty ones included).
Every bool TensorRT returns is checked: a refused call raises SpectrtError naming the tensor.

``TrtKVRunner`` (``base``, ``hydra_prefix``; batch 1) keeps the KV cache on the device. Per KV layer and
K/V: a cache ``[max_context, 1, kv_heads, head_dim]`` whose base address is bound to ``past_*`` (shape
``[past, ...]``: the prefix ``cache[:past]``), and a scratch ``[max_q, 1, kv_heads, head_dim]`` bound to
``new_*``. ``commit(rows)`` copies the accepted scratch rows to ``cache[past:past + len(rows)]``
(device-to-device, one copy per contiguous run per buffer) and advances ``past``; ``rollback``/``reset``
move the integer. The new rows can't be written in place at ``cache + past * row_bytes``: that address is
only 256-byte aligned when ``past * row_bytes`` is (a 384-byte fp16 row of SmolLM2 is not).

The optimization profile is chosen per call: among the engine's profiles that hold the call's shape, the
one whose opt shape is nearest (``decode`` for verify-sized q, ``prefill`` for prompt chunks).

Usage::

    with TrtBaseRunner(load_artifact(DIR), profile="orin-nano-8gb") as r:
        out = r.forward(ids, positions, mask)   # BaseOutputs: greedy_ids [q], hidden_states [q, H], logits [q, V]
        r.commit([0, 2, 5])                      # keep tree rows 0, 2, 5
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

from spectrt.runtime.artifact import Artifact
from spectrt.runtime.contract import BASE, HYDRA_PREFIX, MODEL_DTYPE, graph_spec, io_mismatch
from spectrt.runtime.engines import EngineFromArtifact
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.ort_runner import BaseOutputs, ContextFull, check_rows

if TYPE_CHECKING:
    import tensorrt as trt

ALIGN = 256  # bytes: TensorRT's alignment rule for tensor addresses (cudaMalloc guarantees at least this)


def copy_runs(rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(src, dst, n)`` row copies that gather ``rows`` (strictly increasing) to ``0..len(rows)-1``,
    consecutive rows merged into one copy."""
    runs: list[tuple[int, int, int]] = []
    for dst, src in enumerate(rows):
        if runs and runs[-1][0] + runs[-1][2] == src:
            s, d, n = runs[-1]
            runs[-1] = (s, d, n + 1)
        else:
            runs.append((src, dst, 1))
    return runs


class _Device:
    """The runner's CUDA (polygraphy's wrapper over libcudart): one stream and the buffers allocated on it.

    Five calls in all: malloc, free, memcpy (H2D / D2H / D2D, async on the stream), stream create/sync.
    """

    def __init__(self) -> None:
        from polygraphy import cuda

        self.cuda, self.w = cuda, cuda.wrapper()
        self.stream = cuda.Stream()
        self.ptrs: list[int] = []

    def alloc(self, nbytes: int) -> int:
        ptr = int(self.w.malloc(max(int(nbytes), ALIGN)))  # never 0 bytes: empty tensors need an address too
        self.ptrs.append(ptr)
        if not ptr or ptr % ALIGN:
            raise SpectrtError(f"cudaMalloc returned {ptr:#x}, not {ALIGN}-byte aligned")
        return ptr

    def h2d(self, dst: int, src: np.ndarray) -> None:
        if src.nbytes:
            self.w.memcpy(dst, src.ctypes.data, src.nbytes, self.cuda.MemcpyKind.HostToDevice, self.stream.ptr)

    def d2h(self, dst: np.ndarray, src: int) -> None:
        if dst.nbytes:
            self.w.memcpy(dst.ctypes.data, src, dst.nbytes, self.cuda.MemcpyKind.DeviceToHost, self.stream.ptr)

    def d2d(self, dst: int, src: int, nbytes: int) -> None:
        self.w.memcpy(dst, src, nbytes, self.cuda.MemcpyKind.DeviceToDevice, self.stream.ptr)

    def sync(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self.sync()
        while self.ptrs:
            self.w.free(self.ptrs.pop())
        self.stream.free()


class _TrtRunner:
    """One engine, its execution context, a stream and device buffers. Subclasses allocate in ``_allocate``."""

    runtime: trt.Runtime | None
    engine: trt.ICudaEngine | None
    context: trt.IExecutionContext | None

    def __init__(self, artifact: Artifact, graph: str, profile=None, strict_gpu: bool = True):
        self.artifact, self.graph, self.spec = artifact, graph, graph_spec(graph)
        self.dims = artifact.dims(graph)
        self.loader = EngineFromArtifact(artifact, graph, profile, strict_gpu)
        self.profile, self.record = self.loader.profile, self.loader.record
        self.ranges = [p.dims for p in self.record.optimization_profiles]  # per profile: {dim: (min, opt, max)}
        self.runtime = self.engine = self.context = None
        self.device: _Device | None = None
        self.addresses: dict[str, int] = {}  # I/O tensor -> device address (bound after every profile switch)
        self.dtypes: dict[str, np.dtype] = {}
        self._host: dict[str, np.ndarray] = {}  # output -> host buffer (flat, sized for the largest call)
        self.outputs: tuple = ()  # the contract's outputs the engine has (optional ones may be absent)
        self._active = -1  # the optimization profile selected on the context

    def __enter__(self):
        try:
            self.runtime, self.engine = self.loader()
            self._check_io(self.engine)
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise SpectrtError(f"TensorRT could not create an execution context for '{self.graph}' (out of device "
                                   "memory?)")
            self.device = _Device()
            self._allocate()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None
        self.context = self.engine = self.runtime = None
        self.addresses.clear()
        self._active = -1

    def _check_io(self, engine: trt.ICudaEngine) -> None:
        """The engine's I/O tensors and dtypes must be the contract's (an engine of another graph or dtype fails here)."""
        import tensorrt as trt

        ins, outs = self.spec.expand(self.dims)
        have = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        missing, extra = io_mismatch(ins + outs, have)
        if missing or extra:
            raise SpectrtError(f"the {self.graph}.{self.profile} engine's tensors differ from the contract's (missing "
                               f"{missing[:3]}, extra {extra[:3]}); rebuild it")
        self.outputs = tuple(s for s in self.spec.outputs if s.name in have)  # optional ones may be absent
        want = {s.name: np.dtype(s.resolve(self.dims, self.artifact.dtype)[1]) for s in ins + outs if s.name in have}
        for name, dt in want.items():
            self.dtypes[name] = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            if self.dtypes[name] != dt:
                raise SpectrtError(f"the {self.graph}.{self.profile} engine's '{name}' is {self.dtypes[name]}, the "
                                   f"artifact's is {dt}; rebuild the engine")

    def _allocate(self) -> None:  # pragma: no cover - subclass hook
        raise NotImplementedError

    def _shape(self, spec, n: int) -> tuple[int, ...]:  # pragma: no cover - subclass hook
        raise NotImplementedError

    def _allocate_io(self, n: int) -> None:
        """A device buffer per I/O tensor and a host buffer per output, sized for ``n`` (max q or max batch)."""
        for s in self.spec.inputs + self.outputs:
            self._alloc(s.name, self._nbytes(s.name, self._shape(s, n)))
        for s in self.outputs:
            self._host[s.name] = np.empty(math.prod(self._shape(s, n)), self.dtypes[s.name])

    def _alloc(self, name: str, nbytes: int) -> int:
        assert self.device is not None
        self.addresses[name] = ptr = self.device.alloc(nbytes)
        return ptr

    def _nbytes(self, name: str, shape: Sequence[int]) -> int:
        return math.prod(shape) * self.dtypes[name].itemsize

    def _pick_profile(self, **values: int) -> int:
        """The optimization profile for a call: it must hold every value; nearest opt of the first one wins."""
        key = next(iter(values))
        fits = [i for i, r in enumerate(self.ranges) if all(r[k][0] <= v <= r[k][2] for k, v in values.items())]
        if not fits:
            limits = "; ".join(f"{k} {r[k][0]}..{r[k][2]}" for r in self.ranges for k in values)
            raise SpectrtError(f"{self.graph}: {values} is outside every optimization profile of the engine ({limits})")
        return min(fits, key=lambda i: (abs(self.ranges[i][key][1] - values[key]), self.ranges[i][key][2]))

    def _select(self, index: int) -> None:
        """Select an optimization profile (before any shape is set) and (re)bind every address for it."""
        assert self.context is not None and self.device is not None
        if index == self._active:
            return
        self._active = -1
        if not self.context.set_optimization_profile_async(index, self.device.stream.ptr):
            raise SpectrtError(f"TensorRT refused optimization profile {index} of the {self.graph} engine")
        for name, ptr in self.addresses.items():
            if not self.context.set_tensor_address(name, ptr):
                raise SpectrtError(f"TensorRT refused address {ptr:#x} for '{name}' of {self.graph}")
        self._active = index

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        assert self.context is not None
        if not self.context.set_input_shape(name, shape):
            raise SpectrtError(f"TensorRT refused shape {list(shape)} for '{name}' of {self.graph} (optimization "
                               f"profile {self._active}: {self.ranges[self._active]})")

    def _execute(self) -> None:
        assert self.context is not None and self.device is not None
        if not self.context.execute_async_v3(self.device.stream.ptr):
            raise SpectrtError(f"TensorRT failed to run {self.graph} (execute_async_v3 returned False; see its log)")


class TrtKVRunner(_TrtRunner):
    """A graph with a KV cache (``base``, ``hydra_prefix``) at batch 1; the interface of ``OrtKVRunner``.

    ``run(**inputs)`` takes the q new tokens' inputs without the batch dim (``[q, ...]``) and returns
    ``[q, ...]`` host views of the outputs, valid until the next call (outputs in ``skip`` are not copied
    back and come back as None).
    """

    def __init__(self, artifact: Artifact, graph: str, profile=None, max_q: int | None = None,
                 max_context: int | None = None, strict_gpu: bool = True, skip: Sequence[str] = ()):
        super().__init__(artifact, graph, profile, strict_gpu)
        top = self.record.max_dims()
        self.max_q = min(top["q"], max_q or top["q"])
        self.max_context = min(top["past"] + 1, artifact.max_context, max_context or top["past"] + 1)
        self.layers = self.spec.num_kv_layers(self.dims)
        self.skip = frozenset(skip)
        self.past = 0
        self._last_q = 0
        self._kv: list[tuple[int, int]] = []  # per layer and K/V: (cache, scratch) addresses

    def _shape(self, spec, q: int) -> tuple[int, ...]:
        shape, _ = spec.resolve({**self.dims, "batch": 1, "q": q}, MODEL_DTYPE)
        return tuple(int(d) for d in shape)

    def _allocate(self) -> None:
        self._allocate_io(self.max_q)
        self.row = (1, self.dims["kv_heads"], self.dims["head_dim"])  # one token of one layer's K or V
        self.row_bytes = self._nbytes("past_key.0", self.row)
        self._kv = []
        for i in range(self.layers):
            for kind in ("key", "value"):
                cache = self._alloc(f"past_{kind}.{i}", self.max_context * self.row_bytes)  # cache[:past]
                scratch = self._alloc(f"new_{kind}.{i}", self.max_q * self.row_bytes)
                self._kv.append((cache, scratch))
        self.past, self._last_q = 0, 0

    def run(self, **inputs) -> dict[str, np.ndarray | None]:
        assert self.device is not None
        q = len(inputs[self.spec.inputs[0].name])
        if not 1 <= q <= self.max_q:
            raise SpectrtError(f"{self.graph} call with {q} tokens; the engine takes 1..{self.max_q} (feed the prompt "
                               "in smaller chunks)")
        if self.past + q > self.max_context:
            raise ContextFull(f"context limit reached: {self.past} + {q} tokens > max context {self.max_context}")
        self._select(self._pick_profile(q=q, past=self.past))
        staged = []  # host inputs, alive until the stream is synchronized
        for s in self.spec.inputs:
            shape = self._shape(s, q)
            arr = np.ascontiguousarray(inputs[s.name], dtype=self.dtypes[s.name]).reshape(shape)
            self._set_shape(s.name, shape)
            self.device.h2d(self.addresses[s.name], arr)
            staged.append(arr)
        for i in range(self.layers):
            for kind in ("key", "value"):
                self._set_shape(f"past_{kind}.{i}", (self.past,) + self.row)
        self._execute()
        out: dict[str, np.ndarray | None] = {}
        for s in self.outputs:
            if s.name in self.skip:
                out[s.name] = None
                continue
            shape = self._shape(s, q)
            view = self._host[s.name][:math.prod(shape)].reshape(shape)
            self.device.d2h(view, self.addresses[s.name])
            out[s.name] = view[0]
        self.device.sync()
        self._last_q = q
        return out

    def commit(self, rows: Sequence[int]) -> None:
        """Keep the last call's tokens at ``rows`` (strictly increasing) as cache rows ``past..past+len-1``."""
        assert self.device is not None
        rows = check_rows(rows, self._last_q)
        rb = self.row_bytes
        for src, dst, n in copy_runs(rows):
            for cache, scratch in self._kv:
                self.device.d2d(cache + (self.past + dst) * rb, scratch + src * rb, n * rb)  # stream-ordered
        self.past += len(rows)
        self._last_q = 0

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` committed tokens."""
        if not 0 <= n <= self.past:
            raise SpectrtError(f"rollback of {n} tokens with {self.past} in the cache")
        self.past -= n
        self._last_q = 0

    def reset(self) -> None:
        self.past = 0
        self._last_q = 0


class TrtBaseRunner(TrtKVRunner):
    """``base``: token ids in; greedy ids, hidden states and (with ``copy_logits``) logits out.

    ``copy_logits=False`` skips the ``q x vocab`` device-to-host copy (greedy decoding needs only greedy_ids).
    ``greedy_ids`` comes from the engine's TopK, which does not promise the contract's first-maximum index on
    ties (docs/JETSON.md): exact ties can resolve differently than on ONNX Runtime or between profiles.
    """

    def __init__(self, artifact: Artifact, profile=None, max_q: int | None = None, max_context: int | None = None,
                 copy_logits: bool = True, strict_gpu: bool = True):
        super().__init__(artifact, BASE.name, profile, max_q, max_context, strict_gpu,
                         skip=() if copy_logits else ("logits",))

    @property
    def copy_logits(self) -> bool:
        return "logits" not in self.skip

    @copy_logits.setter
    def copy_logits(self, on: bool) -> None:
        self.skip = self.skip - {"logits"} if on else self.skip | {"logits"}

    def forward(self, input_ids, position_ids, tree_mask) -> BaseOutputs:
        """q new tokens after ``past`` (ids/positions ``[q]``, mask ``[q, q]``) -> greedy_ids ``[q]``,
        hidden_states ``[q, H]``, logits ``[q, V]`` or None; their K/V wait in the scratch for ``commit``."""
        out = self.run(input_ids=input_ids, position_ids=position_ids, tree_mask=tree_mask)
        return BaseOutputs(out["greedy_ids"], out["hidden_states"], out["logits"])  # type: ignore[arg-type]


class TrtPrefixRunner(TrtKVRunner):
    """``hydra_prefix`` (Hydra++): base hidden states of committed tokens in, prefix-layer context out."""

    def __init__(self, artifact: Artifact, profile=None, max_q: int | None = None, max_context: int | None = None,
                 strict_gpu: bool = True):
        super().__init__(artifact, HYDRA_PREFIX.name, profile, max_q, max_context, strict_gpu)

    def forward(self, hidden_states, position_ids, tree_mask) -> np.ndarray:
        """Context states ``[q, H]`` (a host view, valid until the next call)."""
        context = self.run(hidden_states=hidden_states, position_ids=position_ids, tree_mask=tree_mask)["context"]
        assert context is not None
        return context


class TrtGraphRunner(_TrtRunner):
    """A stateless graph (heads, draft_lm_head, hydra_head.i, hydra_lm_head.i): ``runner(**inputs)`` ->
    ``{output: [batch, ...] host view}``, valid until the next call; the interface of ``OrtGraphRunner``."""

    def __init__(self, artifact: Artifact, graph: str, profile=None, max_batch: int | None = None,
                 strict_gpu: bool = True):
        spec = graph_spec(graph)
        if spec.per_layer_inputs:
            raise SpectrtError(f"TrtGraphRunner runs stateless graphs, not '{graph}' (use TrtBaseRunner / "
                               "TrtPrefixRunner)")
        super().__init__(artifact, graph, profile, strict_gpu)
        top = self.record.max_dims()["batch"]
        self.max_batch = min(top, max_batch or top)

    def _shape(self, spec, batch: int) -> tuple[int, ...]:
        shape, _ = spec.resolve({**self.dims, "batch": batch}, MODEL_DTYPE)
        return tuple(int(d) for d in shape)

    def _allocate(self) -> None:
        self._allocate_io(self.max_batch)

    def has_output(self, name: str) -> bool:
        """True when the engine has this output (inside ``with``; optional outputs may be absent)."""
        return name in self._host

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        assert self.device is not None
        batch = len(next(iter(inputs.values())))
        if not 1 <= batch <= self.max_batch:
            raise SpectrtError(f"{self.graph}: batch {batch} outside the engine's 1..{self.max_batch}")
        self._select(self._pick_profile(batch=batch))
        staged = []
        for s in self.spec.inputs:
            if s.name not in inputs:
                raise SpectrtError(f"{self.graph} needs input '{s.name}'")
            shape = self._shape(s, batch)
            arr = np.ascontiguousarray(inputs[s.name], dtype=self.dtypes[s.name]).reshape(shape)
            self._set_shape(s.name, shape)
            self.device.h2d(self.addresses[s.name], arr)
            staged.append(arr)
        self._execute()
        out = {}
        for s in self.outputs:
            shape = self._shape(s, batch)
            out[s.name] = view = self._host[s.name][:math.prod(shape)].reshape(shape)
            self.device.d2h(view, self.addresses[s.name])
        self.device.sync()
        return out


__all__ = ["ALIGN", "copy_runs", "TrtKVRunner", "TrtBaseRunner", "TrtPrefixRunner", "TrtGraphRunner"]
