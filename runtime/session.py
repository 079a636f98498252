"""A ready-to-generate session over an exported directory: tokenizer, base runner, drafter and tree."""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

from spectrt.runtime.contract import DEFAULT_PREFILL_CHUNK
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.generate import Decoder, GenerationResult
from spectrt.runtime.manifest import load_artifact
from spectrt.runtime.ort_runner import DEFAULT_PROVIDER, OrtBaseRunner, OrtGraphRunner
from spectrt.runtime.text import StreamPrinter, TextCodec
from spectrt.runtime.tree import Tree

DEFAULT_MAX_NEW_TOKENS = 128
MODES = ("spec", "ar")


class OrtBackend:
    """ONNX Runtime graphs (CPU by default; CUDA/TensorRT execution providers where installed)."""

    @staticmethod
    def base(artifact, config: "SessionConfig", max_q: int):
        return OrtBaseRunner(artifact, max_q=max_q, provider=config.provider, max_context=config.max_context,
                             threads=config.threads)

    @staticmethod
    def graph(artifact, name: str, config: "SessionConfig", max_batch: int):
        return OrtGraphRunner(artifact, name, max_batch, config.provider, config.threads)


class TrtBackend:
    """TensorRT engines built by `spectrt build` (device buffers, one stream); imported lazily."""

    @staticmethod
    def base(artifact, config: "SessionConfig", max_q: int):
        from spectrt.runtime.trt_runner import TrtBaseRunner

        return TrtBaseRunner(artifact, profile=config.profile, copy_logits=False)

    @staticmethod
    def graph(artifact, name: str, config: "SessionConfig", max_batch: int):
        from spectrt.runtime.trt_runner import TrtGraphRunner

        return TrtGraphRunner(artifact, name, profile=config.profile)


BACKENDS = {"ort": OrtBackend, "trt": TrtBackend}
DEFAULT_BACKEND = "ort"


@dataclass
class SessionConfig:
    backend: str = DEFAULT_BACKEND  # key of BACKENDS
    profile: str | None = None  # device profile of the TensorRT engines (trt backend)
    provider: str = DEFAULT_PROVIDER
    max_context: int | None = None
    threads: int | None = None
    mode: str | None = None  # None: "spec" when the export has a drafter, else "ar"
    tree: str | None = None  # tree JSON path; None: the export's default tree
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK


class SpecSession:
    """Owns the runners for one artifact; ``generate`` runs greedy decoding in the chosen mode."""

    def __init__(self, artifact_dir, config: SessionConfig | None = None):
        self.config = config or SessionConfig()
        self.artifact = load_artifact(artifact_dir)
        self.codec = TextCodec(self.artifact)
        draft = self.artifact.manifest.get("draft")
        mode = self.config.mode or ("spec" if draft else "ar")
        if mode not in MODES:
            raise SpectrtError(f"unknown mode '{mode}' (choose from {', '.join(MODES)})")
        if mode == "spec" and not draft:
            raise SpectrtError(f"{self.artifact.root}: no draft heads in this export; use --mode ar or export --heads")
        self.mode = mode
        if self.config.backend not in BACKENDS:
            raise SpectrtError(f"unknown backend '{self.config.backend}' (choose from {', '.join(BACKENDS)})")
        self.backend = BACKENDS[self.config.backend]
        self.tree = None
        if mode == "spec":
            self.tree = Tree.load(self.config.tree) if self.config.tree else Tree.from_paths(draft["tree"]["paths"])
        self._stack = ExitStack()

    def __enter__(self):
        c = self.config
        max_q = max(c.prefill_chunk, self.tree.size if self.tree else 1)
        self.base = self._stack.enter_context(self.backend.base(self.artifact, c, max_q))
        drafter = None
        if self.mode == "spec":
            from spectrt.runtime.drafters import drafter_for

            graphs = lambda name, max_batch: self.backend.graph(self.artifact, name, c, max_batch)  # noqa: E731
            drafter = self._stack.enter_context(drafter_for(self.artifact, self.tree, graphs))
        self.decoder = Decoder(self.base, drafter, self.tree, self.codec.eos_ids, c.prefill_chunk)
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    @property
    def max_context(self) -> int:
        return self.base.max_context

    def generate(self, prompt_ids, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stream=None) -> GenerationResult:
        on_tokens = StreamPrinter(self.codec, stream) if stream else None
        return self.decoder.generate(prompt_ids, max_new_tokens, on_tokens)
