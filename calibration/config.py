"""The settings of ``spectrt distill``, every default in one place. No torch: the CLI reads these defaults."""
from __future__ import annotations

from dataclasses import dataclass

from spectrt.runtime.errors import SpectrtError

LOSSES = ("lm", "teacher")
LM_HEADS = ("shared", "own")  # shared: the heads reuse the base's LM head; own: one LM head per head


@dataclass
class DistillConfig:
    """Every default of ``spectrt distill`` lives here."""

    arch: str = "medusa"
    heads: int = 3
    layers: int = 1
    lm_head: str = "shared"  # one of LM_HEADS
    version: str | None = None  # deprecated spelling of lm_head: "1" = own, "2" = shared (validate() maps it)
    limit: int | None = None  # number of prompts taken from the file (first N)
    exclude: tuple = ()  # prompts files whose prompts are never trained on (e.g. the calibration prompts)
    copy_tasks: int = 0  # extra training prompts that ask to summarize / rewrite / extract from the base's own answers
    max_new_tokens: int = 128
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 256  # token positions per optimizer step
    gen_batch_size: int = 16  # prompts per generate() batch
    hidden_batch_tokens: int = 4096  # tokens per forward pass when caching hidden states
    seed: int = 0
    loss: str = "lm"  # chosen by measurement, see the module docstring of this file's report
    decay: float = 0.8  # head k's loss weight is decay**k
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of steps with linear LR warm-up
    holdout: float = 0.05  # fraction of prompts held out for the accuracy report (at least 1)
    half: bool = True  # save the heads as fp16
    cache_dir: str | None = None  # default: $SPECTRT_CACHE/calibration (generations + hidden states)
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    bf16: bool | None = None  # frozen LM-head matmuls in bfloat16 (None: when the CPU has native bf16)
    # shared-LM-head heads (Medusa, Hydra) trained on the N most frequent tokens of a VocabTrim ranking only:
    # the rows a trimmed export drafts from (its draft LM head), ~20x cheaper a step than the full vocabulary
    # on a CPU without bf16; None: the full vocabulary
    train_vocab: int | None = None
    vocab: str | None = None  # the ranking (`spectrt calibrate vocab`); None: the built-in model's

    @property
    def shared_lm_head(self) -> bool:
        return self.lm_head == "shared"

    def validate(self) -> None:
        if self.arch != "medusa":
            raise SpectrtError(f"unsupported draft architecture '{self.arch}' (supported: medusa)")
        if self.version is not None:
            if str(self.version) not in ("1", "2"):
                raise SpectrtError(f"--version must be 1 or 2, not {self.version} (deprecated: use --lm-head "
                                   f"{'|'.join(LM_HEADS)})")
            self.lm_head, self.version = ("own" if str(self.version) == "1" else "shared"), None
        if self.lm_head not in LM_HEADS:
            raise SpectrtError(f"--lm-head must be one of {', '.join(LM_HEADS)}, not {self.lm_head}")
        if self.loss not in LOSSES:
            raise SpectrtError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss}")
        if self.copy_tasks < 0:
            raise SpectrtError("--copy-tasks must be at least 0")
        for name in ("heads", "epochs", "max_new_tokens", "batch_size", "gen_batch_size"):
            if getattr(self, name) < 1:
                raise SpectrtError(f"--{name.replace('_', '-')} must be at least 1")
        if self.layers < 0:
            raise SpectrtError("--layers must be at least 0")
        if not self.lr > 0:
            raise SpectrtError("--lr must be positive")
        if not 0 <= self.holdout < 1:
            raise SpectrtError("holdout must be a fraction in [0, 1)")
        if self.train_vocab is not None:
            if self.train_vocab < 1:
                raise SpectrtError("--train-vocab must be at least 1")
            if self.lm_head != "shared":
                raise SpectrtError("--train-vocab trains heads that share the base's LM head (--lm-head shared); "
                                   "own LM heads are trained over the full vocabulary")


HYDRA_ARCHS = {"hydra": "mlp", "hydra++": "prefix-mlp"}


@dataclass
class HydraDistillConfig(DistillConfig):
    arch: str = "hydra"
    layers: int = 2  # blocks per head (the first, input-reducing block included)
    loss: str | None = None  # None: lm for hydra, teacher for hydra++
    dropout: float | None = None  # None: 0 for hydra, 0.1 for hydra++

    def validate(self) -> None:
        if self.arch not in HYDRA_ARCHS:
            raise SpectrtError(f"unsupported draft architecture '{self.arch}' (supported: medusa, "
                               f"{', '.join(HYDRA_ARCHS)})")
        if self.loss is None:
            self.loss = "teacher" if self.arch == "hydra++" else "lm"
        if self.dropout is None:
            self.dropout = 0.1 if self.arch == "hydra++" else 0.0
        if self.layers < 1:
            raise SpectrtError("--layers must be at least 1 for hydra heads")
        if not 0 <= self.dropout < 1:
            raise SpectrtError("--dropout must be in [0, 1)")
        arch, layers = self.arch, self.layers
        self.arch, self.layers = "medusa", max(layers, 0)  # the shared checks of the Medusa config
        try:
            DistillConfig.validate(self)
        finally:
            self.arch, self.layers = arch, layers
        if self.loss not in LOSSES:
            raise SpectrtError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss}")
