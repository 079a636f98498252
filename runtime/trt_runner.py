"""TensorRT runners for the contract's graphs (torch-free; tensorrt and CUDA are imported lazily).

Memory model of ``TrtBaseRunner`` (one stream, everything allocated once in ``__enter__``):

* I/O buffers sized from the optimization profiles' max shapes (the build record's dims + the contract);
  their addresses are bound once. Per step only the input shapes change.
* KV cache: one device buffer per layer and per K/V, token-major ``[max_context, batch=1, kv_heads,
  head_dim]`` as in the contract. ``past_*`` inputs are bound to ``cache[:past]`` (the buffer's base, shape
  set per step) and ``new_*`` outputs to ``cache[past:past+q]`` (base + past * row_bytes): the graph
  writes new K/V in place, no concat and no host copy.
* ``commit(accepted_rows)`` moves the accepted tree rows ``past+accepted_rows[i] -> past+i`` with
  device-to-device ``cudaMemcpyAsync`` (contiguous runs merged, chunks never overlap) and advances
  ``past``; ``rollback(n)`` / ``reset()`` only move the integer.

Usage::

    with TrtBaseRunner(load_artifact(DIR), profile="orin-nano-8gb") as r:
        out = r.forward(ids, positions, mask)   # BaseOutputs: greedy_ids [q], hidden_states [q, H], logits [q, V]
        r.commit([0, 2, 5])                      # keep tree rows 0, 2, 5
"""
from __future__ import annotations

import numpy as np

from spectrt.runtime.contract import BASE, MODEL_DTYPE, graph_spec
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.ort_runner import BaseOutputs, ContextFull  # the shared runner interface


def compaction_plan(accepted_rows) -> list[tuple[int, int, int]]:
    """Row moves ``(src, dst, n)`` (relative to ``past``) that compact accepted rows to ``0..len-1``.

    ``accepted_rows`` must be strictly increasing (a root-to-leaf path of a topologically ordered tree),
    so ``src >= dst`` always. Runs of consecutive rows are merged, identity moves dropped, and every copy
    is split into chunks of at most ``src - dst`` rows so no copy's source and destination overlap
    (cudaMemcpyAsync does not allow overlap); executing the moves in order gives the compacted cache.
    """
    rows = [int(r) for r in accepted_rows]
    for i, r in enumerate(rows):
        if r < 0 or (i and r <= rows[i - 1]):
            raise SpectrtError(f"accepted rows must be non-negative and strictly increasing, got {rows}")
    plan, i = [], 0
    while i < len(rows):
        src, dst, n = rows[i], i, 1
        while i + n < len(rows) and rows[i + n] == src + n:
            n += 1
        gap = src - dst
        if gap:
            for off in range(0, n, gap):
                plan.append((src + off, dst + off, min(gap, n - off)))
        i += n
    return plan


def _profile_name(artifact, graph: str, profile: str | None) -> str:
    engines = {k: v for k, v in artifact.manifest.get("engines", {}).items() if v.get("graph") == graph}
    if profile is not None:
        return getattr(profile, "name", profile)
    names = sorted({v["profile"] for v in engines.values()})
    if len(names) == 1:
        return names[0]
    if not names:
        raise SpectrtError(f"{artifact.root}: no TensorRT engine for '{graph}'; run `spectrt build {artifact.root} "
                           "--profile NAME` on this device")
    raise SpectrtError(f"{artifact.root}: engines for several profiles ({', '.join(names)}); pass profile=")


class EngineFromArtifact:
    """Lazy loader: deserializes ``DIR/engines/<graph>.<profile>.engine`` after checking its build record
    against this TensorRT/GPU and the artifact's graph hashes."""

    def __init__(self, artifact, graph: str, profile: str | None = None, strict_gpu: bool = True):
        self.artifact, self.graph, self.strict_gpu = artifact, graph, strict_gpu
        self.profile = _profile_name(artifact, graph, profile)

    @property
    def record(self) -> dict:
        from spectrt.profiles.build import engine_name

        return self.artifact.manifest["engines"][engine_name(self.graph, self.profile)]

    def __call__(self):
        import tensorrt as trt

        from spectrt.profiles.build import load_engine_bytes

        data = load_engine_bytes(self.artifact, self.graph, self.profile, strict_gpu=self.strict_gpu)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise SpectrtError(f"TensorRT could not deserialize the '{self.graph}.{self.profile}' engine")
        return runtime, engine


class _DeviceBuffer:
    def __init__(self, nbytes: int):
        from polygraphy import cuda

        self.nbytes = max(int(nbytes), 1)
        self.ptr = cuda.wrapper().malloc(self.nbytes)

    def free(self) -> None:
        from polygraphy import cuda

        if self.ptr:
            cuda.wrapper().free(self.ptr)
            self.ptr = 0


class _TrtRunnerBase:
    """Shared engine/context/stream/buffer handling. Subclasses bind tensors in ``_bind``."""

    graph = ""

    def __init__(self, artifact, graph: str, profile: str | None = None, strict_gpu: bool = True):
        self.artifact = artifact
        self.graph = graph
        self.loader = EngineFromArtifact(artifact, graph, profile, strict_gpu)
        self.profile = self.loader.profile
        self.spec = graph_spec(graph)
        self._buffers: dict[str, _DeviceBuffer] = {}
        self._host: dict[str, np.ndarray] = {}
        self._addresses: dict[str, int] = {}  # tensor name -> device pointer, bound once
        self.engine = self.context = self.stream = self._runtime = None
        self._active_profile = -1

    # profile dims from the build record, in build order: [(label, {dim: (min, opt, max)})]
    def _record_profiles(self) -> list[tuple[str, dict]]:
        return [(p["label"], {k: tuple(v) for k, v in p["dims"].items()})
                for p in self.loader.record["optimization_profiles"]]

    def _dims(self) -> dict:
        from spectrt.profiles import graph_dims

        return graph_dims(self.artifact, self.graph)

    def _max_dims(self) -> dict:
        out = {}
        for _, dims in self._record_profiles():
            for k, (_, _, mx) in dims.items():
                out[k] = max(out.get(k, 0), mx)
        return out

    def _alloc(self, name: str, shape: tuple, dtype) -> int:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf = self._buffers[name] = _DeviceBuffer(nbytes)
        return buf.ptr

    def __enter__(self):
        from polygraphy import cuda

        try:
            self._runtime, self.engine = self.loader()
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise SpectrtError(f"TensorRT could not create an execution context for '{self.graph}' "
                                   "(out of device memory?)")
            self.stream = cuda.Stream()
            self._bind()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        for b in self._buffers.values():
            b.free()
        self._buffers.clear()
        if self.stream is not None:
            self.stream.free()
            self.stream = None
        self.context = self.engine = self._runtime = None

    def _np_dtype(self, name: str):
        import tensorrt as trt

        return np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))

    def _bind_address(self, name: str, ptr: int) -> None:
        self._addresses[name] = ptr
        self.context.set_tensor_address(name, ptr)

    def _select_profile(self, index: int) -> None:
        if index != self._active_profile:
            if not self.context.set_optimization_profile_async(index, self.stream.ptr):
                raise SpectrtError(f"TensorRT refused optimization profile {index} of '{self.graph}'")
            self._active_profile = index
            for name, ptr in self._addresses.items():  # re-assert the fixed bindings for the new profile
                self.context.set_tensor_address(name, ptr)

    def _h2d(self, name: str, array: np.ndarray) -> None:
        from polygraphy import cuda

        buf = self._buffers[name]
        if array.nbytes > buf.nbytes:
            raise SpectrtError(f"'{name}': {array.shape} exceeds the profile's max shape")
        if array.nbytes:
            cuda.wrapper().memcpy(buf.ptr, array.ctypes.data, array.nbytes, cuda.MemcpyKind.HostToDevice,
                                  self.stream.ptr)

    def _d2h(self, name: str, shape: tuple) -> np.ndarray:
        from polygraphy import cuda

        host = self._host[name]
        out = host.reshape(-1)[: int(np.prod(shape))].reshape(shape)
        if out.nbytes:
            cuda.wrapper().memcpy(out.ctypes.data, self._buffers[name].ptr, out.nbytes, cuda.MemcpyKind.DeviceToHost,
                                  self.stream.ptr)
        return out

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.ptr):
            raise SpectrtError(f"TensorRT failed to run '{self.graph}' (execute_async_v3 returned False)")

    def _bind(self) -> None:  # pragma: no cover - subclass hook
        raise NotImplementedError


class TrtGraphRunner(_TrtRunnerBase):
    """A runner for the stateless graphs (``heads``, ``draft_lm_head``): host numpy in, host numpy out."""

    def __init__(self, artifact, graph: str, profile: str | None = None, strict_gpu: bool = True):
        if graph == BASE.name:
            raise SpectrtError(f"TrtGraphRunner runs heads/draft_lm_head, not '{graph}' (use TrtBaseRunner)")
        super().__init__(artifact, graph, profile, strict_gpu)

    def _bind(self) -> None:
        dims = {**self._dims(), **self._max_dims()}
        self._ranges = self._record_profiles()
        for s in self.spec.inputs + self.spec.outputs:
            shape, _ = s.resolve(dims, MODEL_DTYPE)
            dtype = self._np_dtype(s.name)
            self._bind_address(s.name, self._alloc(s.name, shape, dtype))  # bound once
            self._host[s.name] = np.empty(shape, dtype)  # pinned-size staging for outputs
        self._select_profile(0)

    def __call__(self, **inputs) -> dict:
        """Same call style as OrtGraphRunner: runner(hidden_states=...) -> {output name: array}."""
        return self.infer(inputs)

    def infer(self, feeds: dict) -> dict:
        """feeds: contract input name -> array (batch-major); returns contract output name -> array."""
        dims = self._dims()
        arrays = {}
        for s in self.spec.inputs:
            if s.name not in feeds:
                raise SpectrtError(f"'{self.graph}' needs input '{s.name}'")
            arrays[s.name] = np.ascontiguousarray(feeds[s.name], dtype=self._np_dtype(s.name))
        batch = next(iter(arrays.values())).shape[0]
        lo, _, hi = self._ranges[0][1]["batch"]
        if not lo <= batch <= hi:
            raise SpectrtError(f"'{self.graph}': batch {batch} outside the engine's profile {lo}..{hi}")
        for name, arr in arrays.items():
            self._h2d(name, arr)
            self.context.set_input_shape(name, arr.shape)
        self._execute()
        dims = dict(dims, batch=batch)
        out = {s.name: self._d2h(s.name, s.resolve(dims, MODEL_DTYPE)[0]) for s in self.spec.outputs}
        self.stream.synchronize()
        return {k: v.copy() for k, v in out.items()}


class TrtBaseRunner(_TrtRunnerBase):
    """The base graph with a device-resident KV cache; same interface as the ONNX Runtime runner."""

    def __init__(self, artifact, profile: str | None = None, strict_gpu: bool = True, copy_logits: bool = True):
        super().__init__(artifact, BASE.name, profile, strict_gpu)
        self.copy_logits = copy_logits  # False: skip the q x vocab device-to-host copy (greedy decoding)
        self.past = 0
        self._last_q = 0

    def _bind(self) -> None:
        d = self._dims()
        self.num_layers = int(d["num_layers"])
        self._ranges = self._record_profiles()  # prefill, decode
        mx = self._max_dims()
        self.max_q = mx["q"]
        self.max_context = mx["past"] + 1  # past <= ctx - 1 in every profile
        kv_row = (1, d["kv_heads"], d["head_dim"])  # one token: [batch=1, kv_heads, head_dim]
        full = dict(d, batch=1, q=self.max_q, past=self.max_context)
        for s in BASE.inputs + BASE.outputs:
            shape, _ = s.resolve(full, MODEL_DTYPE)
            dtype = self._np_dtype(s.name)
            self._bind_address(s.name, self._alloc(s.name, shape, dtype))  # bound once
            self._host[s.name] = np.empty(shape, dtype)
        self._kv = []  # per layer: (key ptr, value ptr)
        self._row_bytes = None
        for i in range(self.num_layers):
            ptrs = []
            for kind in ("key", "value"):
                dtype = self._np_dtype(f"past_{kind}.{i}")
                self._row_bytes = int(np.prod(kv_row)) * dtype.itemsize
                ptr = self._alloc(f"cache_{kind}.{i}", (self.max_context,) + kv_row, dtype)
                self._bind_address(f"past_{kind}.{i}", ptr)  # cache[:past], bound once
                ptrs.append(ptr)
            self._kv.append(tuple(ptrs))
        self._kv_row = kv_row

    def _profile_for(self, q: int) -> int:
        # prefer the decode/verify profile (tuned for small q), fall back to prefill
        order = sorted(range(len(self._ranges)), key=lambda i: self._ranges[i][1]["q"][2])
        for i in order:
            lo, _, hi = self._ranges[i][1]["q"]
            if lo <= q <= hi:
                return i
        raise SpectrtError(f"q={q} new tokens exceed the engine's largest profile (q <= {self.max_q}); "
                           "feed the prompt in smaller chunks")

    def forward(self, input_ids, position_ids, tree_mask) -> BaseOutputs:
        """Run q new tokens on top of ``past`` (ids/positions ``[q]``, mask ``[q, q]``; a leading batch dim of 1
        is accepted). Returns host copies: greedy_ids ``[q]``, hidden_states ``[q, H]``, logits ``[q, V]``
        (None with ``copy_logits=False``). New K/V rows land in ``cache[past:past+q]``; ``commit`` keeps some.
        """
        ids = np.ascontiguousarray(input_ids, dtype=self._np_dtype("input_ids")).reshape(1, -1)  # [1, q]
        q = ids.shape[1]
        pos = np.ascontiguousarray(position_ids, dtype=self._np_dtype("position_ids")).reshape(1, q)
        mask = np.ascontiguousarray(tree_mask, dtype=self._np_dtype("tree_mask")).reshape(1, q, q)
        if q < 1:
            raise SpectrtError("forward needs at least one new token")
        if self.past + q > self.max_context:
            raise ContextFull(f"context limit reached: {self.past} + {q} tokens > max context {self.max_context}")
        self._select_profile(self._profile_for(q))
        self._h2d("input_ids", ids)
        self._h2d("position_ids", pos)
        self._h2d("tree_mask", mask)
        ctx = self.context
        ctx.set_input_shape("input_ids", (1, q))
        ctx.set_input_shape("position_ids", (1, q))
        ctx.set_input_shape("tree_mask", (1, q, q))
        past_shape = (self.past,) + self._kv_row  # [past, 1, kv_heads, head_dim]
        offset = self.past * self._row_bytes
        for i, (k, v) in enumerate(self._kv):
            ctx.set_input_shape(f"past_key.{i}", past_shape)
            ctx.set_input_shape(f"past_value.{i}", past_shape)
            ctx.set_tensor_address(f"new_key.{i}", k + offset)  # cache[past:past+q]
            ctx.set_tensor_address(f"new_value.{i}", v + offset)
        self._execute()
        H, V = self._host["hidden_states"].shape[-1], self._host["logits"].shape[-1]
        greedy = self._d2h("greedy_ids", (q,))
        hidden = self._d2h("hidden_states", (q, H))
        logits = self._d2h("logits", (q, V)) if self.copy_logits else None
        self.stream.synchronize()
        self._last_q = q
        return BaseOutputs(greedy.copy(), hidden.copy(), None if logits is None else logits.copy())

    def commit(self, accepted_rows) -> None:
        """Keep rows ``past + accepted_rows[i]`` of the last forward as ``past + i``; advance ``past``."""
        from polygraphy import cuda

        rows = list(accepted_rows)
        if rows and rows[-1] >= self._last_q:
            raise SpectrtError(f"accepted row {rows[-1]} is beyond the {self._last_q} rows of the last forward")
        plan = compaction_plan(rows)
        rb = self._row_bytes
        w = cuda.wrapper()
        for k, v in self._kv:
            for base in (k, v):
                for src, dst, n in plan:  # device to device, stream-ordered, non-overlapping
                    w.memcpy(base + (self.past + dst) * rb, base + (self.past + src) * rb, n * rb,
                             cuda.MemcpyKind.DeviceToDevice, self.stream.ptr)
        self.past += len(rows)
        self._last_q = 0

    def rollback(self, past: int) -> None:
        """Forget everything after the first ``past`` tokens."""
        if not 0 <= past <= self.past:
            raise SpectrtError(f"cannot roll back to {past} (past is {self.past})")
        self.past = past
        self._last_q = 0

    def reset(self) -> None:
        self.rollback(0)


__all__ = ["compaction_plan", "EngineFromArtifact", "TrtGraphRunner", "TrtBaseRunner"]
