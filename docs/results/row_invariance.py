"""What keeps an exact int4 AR step on ONNX Runtime CPU slower than ORT GenAI's: one-row kernels.

Speculative == AR needs a decode step (q = 1) to compute a token's logits bit for bit as a row of a tree
pass (q > 1) does. Part 1 checks that per MatMulNBits setting: one row alone (M = 1) vs the same row
beside another (M = 2), and M = 2 vs M = 4 (SmolLM2's projection shapes, random weights), with the time
of SmolLM2's 120 projections per step. Part 2, given exports: the same check on the whole base graph (a
token's logits from q = 1 vs row 0 of q = 2 and q = 3) and the time of one base call: unpadded, padded
(q = 1 run as 2 rows, what ``WeightsInfo.row_pad`` makes the runner do) and q = 2.

Usage: python docs/results/row_invariance.py [EXPORT_DIR ...] [--threads T]
A benchmark: prints, asserts nothing.
"""
import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from spectrt.runtime.artifact import load_artifact
from spectrt.runtime.ort_runner import OrtBaseRunner

SHAPES = ((576, 960), (576, 576), (576, 3072), (1536, 576))  # SmolLM2: qkv, o, gate_up, down


def nbits_graph(block: int, acc: int, layers: int, threads: int, rng) -> ort.InferenceSession:
    """``layers`` x SHAPES int4 MatMulNBits on random symmetric blocks (no zero points)."""
    nodes, inits, outs = [], [], []
    for li in range(layers):
        for j, (K, N) in enumerate(SHAPES):
            nb = K // block
            w, s, y = f"w{li}_{j}", f"s{li}_{j}", f"y{li}_{j}"
            inits += [numpy_helper.from_array(rng.integers(0, 256, (N, nb, block // 2), dtype=np.uint8), w),
                      numpy_helper.from_array((rng.random(N * nb) * 0.01).astype(np.float32), s)]
            nodes.append(helper.make_node("MatMulNBits", ["x" if K == 576 else "x2", w, s], [y], domain="com.microsoft",
                                          K=K, N=N, bits=4, block_size=block, accuracy_level=acc))
            outs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 576]),
              helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["M", 1536])]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outs, inits),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def timed(fn, rounds: int = 5, calls: int = 10) -> float:
    """Median over rounds of the mean ms per call."""
    fn()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t) / calls * 1e3)
    return float(np.median(out))


def kernels(threads: int) -> None:
    rng = np.random.default_rng(0)
    x = {"x": rng.standard_normal((4, 576)).astype(np.float32), "x2": rng.standard_normal((4, 1536)).astype(np.float32)}
    rows = lambda m: {k: v[:m] for k, v in x.items()}  # noqa: E731
    print("MatMulNBits int4 (SmolLM2 shapes): max |M=1 - M=2|, max |M=2 - M=4| over the row; "
          "ms for 30 layers x 4 projections at M=1, M=2")
    for block in (16, 32):
        for acc in (0, 1, 4):
            s = nbits_graph(block, acc, 30, threads, rng)
            y1, y2, y4 = (s.run(None, rows(m)) for m in (1, 2, 4))
            d12 = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(y1, y2))
            d24 = max(float(np.abs(a - b[:2]).max()) for a, b in zip(y2, y4))
            t1, t2 = (timed(lambda m=m: s.run(None, rows(m))) for m in (1, 2))
            print(f"  block {block:3d} accuracy_level {acc}: {d12:.1e}  {d24:.1e}   {t1:6.2f} ms  {t2:6.2f} ms")


def exports(paths, threads: int) -> None:
    print("base graph: max |logits(q=1) - row 0 of q=2|, of q=2 vs q=3; ms per call at past 150: "
          "q=1 unpadded, q=1 padded, q=2")
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40000, 40)
    for path in paths:
        art = load_artifact(path)
        with OrtBaseRunner(art, max_q=64, threads=threads) as r:
            r.forward(prompt, np.arange(40), np.tril(np.ones((40, 40), bool)))
            r.commit(list(range(40)))

            def call(toks, pad):
                r.pad_single, r.past = pad, 40
                q = len(toks)
                return r.forward(np.array(toks), np.arange(40, 40 + q), np.tril(np.ones((q, q), bool))).logits[0].copy()

            d12 = d23 = 0.0
            for tok in rng.integers(100, 40000, 5):
                a, b, c = call([tok], False), call([tok, 7], False), call([tok, 7, 9], False)
                d12, d23 = max(d12, float(np.abs(a - b).max())), max(d23, float(np.abs(b - c).max()))
            r.commit([])
            ms = []
            for toks, pad in (([42], False), ([42], True), ([42, 7], False)):
                def step(toks=toks, pad=pad):
                    r.pad_single, r.past = pad, 150
                    q = len(toks)
                    r.forward(np.array(toks), np.arange(150, 150 + q), np.tril(np.ones((q, q), bool)))
                ms.append(timed(step, rounds=8, calls=20))
        w = art.manifest.weights
        label = f"{w.kind} {w.format} block {w.block}" if w else "float"
        print(f"  {path} ({label}): {d12:.1e}  {d23:.1e}   " + "  ".join(f"{m:6.2f} ms" for m in ms))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    kernels(a.threads)
    if a.exports:
        exports(a.exports, a.threads)
