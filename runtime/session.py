"""A ready-to-generate session over an exported directory: tokenizer, base runner, drafter and tree."""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

from spectrt.runtime.contract import DEFAULT_PREFILL_CHUNK
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.generate import Decoder, GenerationResult
from spectrt.runtime.manifest import load_artifact
from spectrt.runtime.ort_runner import DEFAULT_PROVIDER, OrtBaseRunner
from spectrt.runtime.text import StreamPrinter, TextCodec
from spectrt.runtime.tree import Tree

DEFAULT_MAX_NEW_TOKENS = 128
MODES = ("spec", "ar")


@dataclass
class SessionConfig:
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
        self.tree = None
        if mode == "spec":
            self.tree = Tree.load(self.config.tree) if self.config.tree else Tree.from_paths(draft["tree"]["paths"])
        self._stack = ExitStack()

    def __enter__(self):
        c = self.config
        max_q = max(c.prefill_chunk, self.tree.size if self.tree else 1)
        self.base = self._stack.enter_context(
            OrtBaseRunner(self.artifact, max_q=max_q, provider=c.provider, max_context=c.max_context, threads=c.threads))
        drafter = None
        if self.mode == "spec":
            from spectrt.runtime.drafters import drafter_for

            drafter = self._stack.enter_context(drafter_for(self.artifact, self.tree, c.provider, c.threads))
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
