"""A ready-to-generate session over an exported directory: tokenizer, base runner, drafter and tree."""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

from spectrt.runtime.artifact import Artifact, load_artifact
from spectrt.runtime.contract import DEFAULT_PREFILL_CHUNK
from spectrt.runtime.drafters import default_draft, draft_parts, drafter_for, heads_tree
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.generate import Decoder, GenerationResult
from spectrt.runtime.ort_runner import CPU_PROVIDER, DEFAULT_PROVIDER, OrtBaseRunner, OrtGraphRunner, OrtPrefixRunner
from spectrt.runtime import trt_runner
from spectrt.runtime.sampling import GREEDY, SamplingConfig
from spectrt.runtime.text import StreamPrinter, TextCodec
from spectrt.runtime.tree import DynamicTree, Tree

DEFAULT_MAX_NEW_TOKENS = 128
MODES = ("spec", "ar")


@dataclass
class SessionConfig:
    backend: str = "ort"  # key of BACKENDS
    profile: str | None = None  # device profile of the TensorRT engines (trt backend)
    provider: str = DEFAULT_PROVIDER
    max_context: int | None = None
    threads: int | None = None
    mode: str | None = None  # None: "spec" when the export has draft heads or a draft is asked for, else "ar"
    tree: str | None = None  # tree JSON path, or "dynamic" (grown per step); None: the export's static tree
    tree_nodes: int | None = None  # node budget of a dynamic tree (root included); None: the export's
    draft: str | None = None  # one of DRAFT_SOURCES; None: drafters.default_draft (for the backend)
    # (an export without heads decodes autoregressively unless mode="spec" or a draft is asked for)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    verify: bool = False  # re-hash every file against the manifest before loading
    sampling: SamplingConfig = GREEDY  # temperature 0: greedy


class OrtRunners:
    """ONNX Runtime graphs (CPU by default; CUDA/TensorRT execution providers where installed)."""

    def __init__(self, artifact: Artifact, config: SessionConfig):
        self.artifact, self.c = artifact, config

    def base(self, max_q: int) -> OrtBaseRunner:
        return OrtBaseRunner(self.artifact, max_q, self.c.provider, self.c.max_context, self.c.threads)

    def prefix(self, max_q: int) -> OrtPrefixRunner:
        return OrtPrefixRunner(self.artifact, max_q, self.c.provider, self.c.max_context, self.c.threads)

    def graph(self, name: str, max_batch: int) -> OrtGraphRunner:
        return OrtGraphRunner(self.artifact, name, max_batch, self.c.provider, self.c.threads)


class TrtRunners:
    """TensorRT engines built by `spectrt build` (device buffers, one stream); tensorrt is imported lazily."""

    def __init__(self, artifact: Artifact, config: SessionConfig):
        self.artifact, self.c = artifact, config

    def base(self, max_q: int) -> trt_runner.TrtBaseRunner:
        return trt_runner.TrtBaseRunner(self.artifact, profile=self.c.profile, copy_logits=not self.c.sampling.greedy)

    def prefix(self, max_q: int) -> trt_runner.TrtPrefixRunner:
        return trt_runner.TrtPrefixRunner(self.artifact, profile=self.c.profile)

    def graph(self, name: str, max_batch: int) -> trt_runner.TrtGraphRunner:
        return trt_runner.TrtGraphRunner(self.artifact, name, profile=self.c.profile)


BACKENDS = {"ort": OrtRunners, "trt": TrtRunners}
DEFAULT_BACKEND = "ort"


class SpecSession:
    """Owns the runners for one artifact; ``generate`` runs greedy decoding in the chosen mode."""

    def __init__(self, artifact_dir, config: SessionConfig | None = None):
        self.config = c = config or SessionConfig()
        if c.backend not in BACKENDS:
            raise SpectrtError(f"unknown backend '{c.backend}' (choose from {', '.join(BACKENDS)})")
        self.artifact = load_artifact(artifact_dir, verify_hashes=c.verify)
        self.codec = TextCodec(self.artifact)
        heads = self.artifact.draft
        self.draft = c.draft or default_draft(self.artifact, cheap_rows=c.backend == "trt" or c.provider != CPU_PROVIDER)
        mode = c.mode or ("spec" if heads or c.draft else "ar")
        if mode not in MODES:
            raise SpectrtError(f"unknown mode '{mode}' (choose from {', '.join(MODES)})")
        if mode == "spec":
            draft_parts(self.artifact, self.draft)  # fail here, before any runner exists
        self.mode = mode
        self.runners = BACKENDS[c.backend](self.artifact, c)
        self.tree: Tree | DynamicTree | None = None  # the heads' tree
        if mode == "spec" and heads:
            self.tree = heads_tree(heads, c.tree, c.tree_nodes)
        self._stack = ExitStack()

    def __enter__(self):
        c = self.config
        drafter = drafter_for(self.artifact, self.tree, self.runners, self.draft) if self.mode == "spec" else None
        max_q = max(c.prefill_chunk, drafter.max_nodes if drafter else 1)
        try:
            self.base = self._stack.enter_context(self.runners.base(max_q))
            if drafter is not None:
                drafter = self._stack.enter_context(drafter)
            self.decoder = Decoder(self.base, drafter, self.codec.eos_ids, c.prefill_chunk, c.sampling)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    @property
    def max_context(self) -> int:
        return self.base.max_context

    def generate(self, prompt_ids, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stream=None,
                 reuse: bool = False) -> GenerationResult:
        """``stream``: a callable that gets text pieces as they are decoded. ``reuse``: keep the K/V of the
        longest prefix this prompt shares with the previous generation's prompt + output (conversations:
        the next turn prefills only its new tokens)."""
        on_tokens = StreamPrinter(self.codec, stream) if stream else None
        return self.decoder.generate(prompt_ids, max_new_tokens, on_tokens, reuse=reuse)
