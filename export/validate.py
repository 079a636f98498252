"""Validation of exported graphs against transformers' own forward pass (ONNX Runtime vs torch)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spectrt.runtime.artifact import ValidationRow
from spectrt.runtime.contract import BASE
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.ort_runner import OrtBaseRunner
from spectrt.runtime.tree import Tree

# Tolerances live next to the outputs in the contract (fp32); fp16 graphs compare looser.
DTYPE_ATOL_SCALE = {"float32": 1.0, "float16": 100.0}
VALIDATION_TEXT = ("Speculative decoding drafts several tokens cheaply and verifies them in one pass of the "
                   "base model, so the output is exactly what the base model alone would produce.")


@dataclass
class Check:
    name: str
    max_abs: float
    atol: float
    argmax_equal: bool = True

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.atol and self.argmax_equal

    def row(self) -> ValidationRow:
        return ValidationRow(self.name, float(self.max_abs), float(self.atol), bool(self.argmax_equal), self.ok)


def dtype_atol(spec, dtype: str) -> float:
    """The contract's fp32 tolerance of an output, scaled for the graph dtype."""
    return spec.atol * DTYPE_ATOL_SCALE[dtype]


def _atol(name: str, dtype: str) -> float:
    return dtype_atol(next(s for s in BASE.outputs if s.name == name), dtype)


def _torch_logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.logits[0].float().numpy(), out.hidden_states[-1][0].float().numpy()


def random_tree(rng: np.random.Generator, nodes: int, max_rank: int = 3) -> Tree:
    paths: list[tuple] = []
    while len(paths) < nodes:
        parent = () if not paths or rng.random() < 0.3 else paths[rng.integers(len(paths))]
        child = parent + (int(rng.integers(max_rank)),)
        if child not in paths:
            paths.append(child)
    return Tree.from_paths(paths)


class ExactQuantKernels:
    """Session loader for a weight-quantized ``base.onnx`` whose quantized MatMuls compute in fp32 on the
    dequantized weights (MatMulNBits ``accuracy_level`` 0; ONNX Runtime's DequantizeLinear+MatMul fusion
    told the same), so it matches the torch model holding ``q * scale`` to fp32 rounding. The runtime's
    default (accuracy level 4: int8 activations) is faster and not exact; the golden file records it."""

    def __init__(self, path):
        self.path = Path(path)

    def __call__(self):
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(self.path), load_external_data=False)
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                for a in node.attribute:
                    if a.name == "accuracy_level":
                        a.i = 0
        # beside the original so the relative external-data location resolves; removed once loaded
        tmp = self.path.with_name(f".{self.path.stem}.exact-{os.getpid()}.onnx")
        try:
            onnx.save_model(model, str(tmp))
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
            return ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
        finally:
            tmp.unlink(missing_ok=True)


def validate_base(artifact, model, prompt_ids: list[int], seed: int = 0, tree_nodes: int = 12) -> list[Check]:
    """Prefill and past-KV fidelity against torch, and the tree check (tree pass == causal paths).

    A weight-quantized export is compared with ``model`` holding the dequantized weights (the exporter
    writes them back), on exact kernels (``ExactQuantKernels``): the contract's tolerances still apply."""
    dtype = artifact.dtype
    la, ha = _atol("logits", dtype), _atol("hidden_states", dtype)
    ref_logits, ref_hidden = _torch_logits(model, prompt_ids)
    n = len(prompt_ids)
    checks = []
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, tree_nodes)
    runner = OrtBaseRunner(artifact, max_q=max(n, tree.size))
    if artifact.manifest.weights is not None:
        runner.loader = ExactQuantKernels(artifact.graph_path(BASE.name))
    with runner as run:
        # 1. whole prompt as one causal chunk
        out = run.forward(np.array(prompt_ids), np.arange(n), np.tri(n, dtype=np.bool_))
        checks.append(Check("prefill logits", np.abs(out.logits - ref_logits).max(), la,
                            bool((out.greedy_ids == ref_logits.argmax(-1)).all())))
        checks.append(Check("prefill hidden_states", np.abs(out.hidden_states - ref_hidden).max(), ha))
        # 2. the same prompt split in two: the second half reads the first half from the KV cache
        h = n // 2
        run.reset()
        run.forward(np.array(prompt_ids[:h]), np.arange(h), np.tri(h, dtype=np.bool_))
        run.commit(range(h))
        out = run.forward(np.array(prompt_ids[h:]), np.arange(h, n), np.tri(n - h, dtype=np.bool_))
        checks.append(Check("decode with past KV", np.abs(out.logits - ref_logits[h:]).max(), la,
                            bool((out.greedy_ids == ref_logits[h:].argmax(-1)).all())))
        # 3. tree check: one tree pass after the prompt vs each root->node path run causally in torch
        run.reset()
        run.forward(np.array(prompt_ids), np.arange(n), np.tri(n, dtype=np.bool_))
        run.commit(range(n))
        tokens = rng.integers(0, artifact.model.vocab, tree.size)
        out = run.forward(tokens, n + tree.depth, tree.mask)
        worst, same = 0.0, True
        for node in range(tree.size):
            path = [node]
            while tree.parent[path[-1]] >= 0:
                path.append(int(tree.parent[path[-1]]))
            ref, _ = _torch_logits(model, list(prompt_ids) + [int(tokens[i]) for i in reversed(path)])
            worst = max(worst, float(np.abs(out.logits[node] - ref[-1]).max()))
            same &= int(out.greedy_ids[node]) == int(ref[-1].argmax())
        checks.append(Check(f"tree pass == causal paths ({tree.size} nodes)", worst, la, same))
    failed = [c for c in checks if not c.ok]
    if failed:
        c = failed[0]
        raise SpectrtError(f"validation failed: {c.name}: max |delta| {c.max_abs:.2e} > {c.atol:.0e} "
                           f"or argmax differs ({c.argmax_equal=})")
    return checks
