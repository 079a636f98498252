"""What exact int4 AR costs on ONNX Runtime CPU: one base-graph call (q = 1) per export, by context length,
side by side in one process, bound the way spectrt's runner binds it (io binding, the in-place KV cache as
input and output), against ORT GenAI's int4 graph bound the same way (past_present_share_buffer).

Usage: python docs/results/attention_pad_cost.py OGA_MODEL_DIR EXPORT_DIR [EXPORT_DIR ...]
       [--contexts 40,300,900] [--reps 10] [--threads 2]

For each export it also prints whether a one-token call's logits equal row 0 of a two-token call bit for bit
(what speculative == AR needs). Typical pair: an int4 matmulnbits export (attention's dummy row, exact) and
the same export made with ``--no-row-pad`` (no dummy row: faster, not exact). A benchmark: prints, asserts
nothing; the host's noise is large, so each figure is the median of ``--reps`` interleaved blocks of 20 calls.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from spectrt.runtime.session import SessionConfig, SpecSession

CACHE_ROWS = 2048  # KV buffer rows; every context must fit


def session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


class Bound:
    """One graph at q = 1 with its KV buffers bound once as input and output; ``call(past)`` runs one token."""

    def __init__(self, path: str, threads: int, oga: bool):
        self.s, self.oga = session(path, threads), oga
        self.b = self.s.io_binding()
        self.bound: list[np.ndarray] = []  # every buffer bound by pointer, kept alive here
        self.ids = np.full((1, 1), 42, np.int64)
        self.pos, self.past = np.zeros((1, 1), np.int64), np.zeros(1, np.int64)
        self.mask = np.ones((1, CACHE_ROWS), np.int64)
        rng = np.random.default_rng(0)
        self.kv = []
        for i in self.s.get_inputs():
            cache = i.name.startswith("past_key_values") if oga else i.name.startswith("cache_")
            if cache:
                c = (rng.random((1, 3, CACHE_ROWS, 64), np.float32) * 0.1)
                self.kv.append(c)
                out = i.name.replace("past_key_values", "present") if oga else "present_" + i.name[len("cache_"):]
                self._bind(i.name, c)
                self._bind(out, c, output=True)
        self._bind("input_ids", self.ids)
        if not oga:
            self._bind("position_ids", self.pos)
            self._bind("past_length", self.past)
            self._bind("tree_mask", np.ones((1, 1, 1), bool))
        for o in self.s.get_outputs():
            if not o.name.startswith("present"):
                self.b.bind_output(o.name, "cpu")

    def _bind(self, name, arr, output=False):
        (self.b.bind_output if output else self.b.bind_input)(name, "cpu", 0, arr.dtype, list(arr.shape),
                                                              arr.ctypes.data)
        self.bound.append(arr)

    def call(self, past: int) -> None:
        if self.oga:
            self.b.bind_input("attention_mask", "cpu", 0, np.int64, [1, past + 1], self.mask.ctypes.data)
        else:
            self.past[0] = past
            self.pos[0, 0] = past
        self.s.run_with_iobinding(self.b)


def one_row_gap(export: str, threads: int) -> float:
    """The runner's load-time probe, as a number (``OrtBaseRunner.one_row_gap``)."""
    with SpecSession(export, SessionConfig(mode="ar", threads=threads)) as s:
        return s.base.one_row_gap()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("oga")
    ap.add_argument("exports", nargs="+")
    ap.add_argument("--contexts", default="40,300,900")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    if max(contexts) + 21 > CACHE_ROWS:
        ap.error(f"contexts must stay below {CACHE_ROWS - 21}")
    for e in a.exports:
        print(f"{e}: one-token call vs row 0 of two, max |logit diff| {one_row_gap(e, a.threads):.3g}")
    graphs = {"ORT GenAI": Bound(str(Path(a.oga) / "model.onnx"), a.threads, oga=True)}
    graphs.update({e: Bound(str(Path(e) / "base.onnx"), a.threads, oga=False) for e in a.exports})
    print(f"ms per q = 1 call, median of {a.reps} blocks of 20 calls (from the context on); ratio to ORT GenAI")
    for past in contexts:
        times = {name: [] for name in graphs}
        for g in graphs.values():  # warm-up
            for i in range(5):
                g.call(past + i)
        for _ in range(a.reps):
            for name, g in graphs.items():
                t = time.perf_counter()
                for i in range(20):
                    g.call(past + i)
                times[name].append((time.perf_counter() - t) / 20 * 1e3)
        ref = float(np.median(times["ORT GenAI"]))
        for name, ts in times.items():
            med = float(np.median(ts))
            print(f"  context {past:4d}  {name:40s} {med:7.3f} ms  {med / ref:5.3f}x")


if __name__ == "__main__":
    main()
