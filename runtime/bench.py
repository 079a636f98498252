"""`spectrt bench`: autoregressive vs speculative decoding on the same prompts, in one process.

Runs are interleaved per prompt after a warm-up, outputs are checked to be identical, and figures are
printed (a benchmark, not a test: nothing here asserts a speed).
"""
from __future__ import annotations

import dataclasses
import json
import os
from contextlib import ExitStack
from pathlib import Path
from collections import defaultdict
from dataclasses import dataclass, field

from spectrt.runtime.drafters import drafter_for
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.generate import Decoder, GenerationResult
from spectrt.runtime.sampling import GREEDY, SamplingConfig
from spectrt.runtime.session import SessionConfig, SpecSession


@dataclass
class Totals:
    tokens: int = 0
    decode_s: float = 0.0
    steps: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    rechecks: int = 0

    def add(self, r: GenerationResult) -> None:
        self.tokens += len(r.tokens) - 1  # the first token comes from prefill
        self.decode_s += r.decode_s
        self.steps += r.steps
        self.draft_s += r.draft_s
        self.verify_s += r.verify_s
        self.rechecks += r.rechecks

    @property
    def tok_s(self) -> float:
        return self.tokens / self.decode_s if self.decode_s else float("nan")

    @property
    def tau(self) -> float:
        return self.tokens / self.steps if self.steps else float("nan")

    def row(self) -> dict:
        return {"tokens": self.tokens, "tok_s": round(self.tok_s, 2), "tau": round(self.tau, 3),
                "draft_ms_per_step": round(1e3 * self.draft_s / max(self.steps, 1), 3),
                "verify_ms_per_step": round(1e3 * self.verify_s / max(self.steps, 1), 3), "rechecks": self.rechecks}


@dataclass
class BenchReport:
    modes: dict = field(default_factory=lambda: defaultdict(Totals))
    categories: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(Totals)))
    prompts: int = 0
    mismatches: int = 0
    sampling: SamplingConfig = GREEDY

    def to_json(self) -> dict:
        out = {"prompts": self.prompts, "mismatches": self.mismatches, "sampling": dataclasses.asdict(self.sampling),
               "modes": {m: t.row() for m, t in self.modes.items()},
               "categories": {c: {m: t.row() for m, t in ms.items()} for c, ms in self.categories.items()}}
        ar = self.modes.get("ar")
        for m, t in self.modes.items():
            if ar is not None and m != "ar":
                out.setdefault("speedups", {})[m] = round(t.tok_s / ar.tok_s, 3)
        if "spec" in out.get("speedups", {}):
            out["speedup"] = out["speedups"]["spec"]
        return out


def run_bench(artifact_dirs, records, max_new_tokens: int, config: SessionConfig | None = None,
              hf_generate=None, progress=None, drafts=None) -> BenchReport:
    """AR (on the first artifact) vs speculative decoding of each artifact in spec mode.

    ``records``: (category, prompt) pairs; ``hf_generate(ids, n) -> (tokens, seconds)`` adds a
    transformers row; ``drafts``: draft sources to compare ("heads", "lookup", "heads+lookup"; None: the
    config's), each a row ``spec:<draft>`` when there are several, all on the same base runner. Every
    output is compared with the AR output.
    """
    config = config or SessionConfig()
    dirs = [artifact_dirs] if isinstance(artifact_dirs, (str, os.PathLike)) else list(artifact_dirs)
    report = BenchReport(sampling=config.sampling)
    with ExitStack() as stack:
        sessions = [stack.enter_context(SpecSession(d, config)) for d in dirs]
        first = sessions[0]
        decoders = {"ar": Decoder(first.base, eos_ids=first.codec.eos_ids, prefill_chunk=config.prefill_chunk,
                                   sampling=config.sampling)}
        for d, s in zip(dirs, sessions):
            if s.mode != "spec":
                continue
            for draft in drafts or [s.draft]:
                name = ("spec" + (f":{Path(d).name}" if len(dirs) > 1 else "")
                        + (f":{draft}" if drafts and len(drafts) > 1 else ""))
                if draft == s.draft:
                    decoders[name] = s.decoder
                else:
                    drafter = stack.enter_context(drafter_for(s.artifact, s.tree, s.runners, draft))
                    decoders[name] = Decoder(s.base, drafter, s.codec.eos_ids, config.prefill_chunk, config.sampling)
        warm = first.codec.encode("Hello!")
        for d in decoders.values():
            d.generate(warm, 8)
        for category, prompt in (progress(records) if progress else records):
            ids = first.codec.encode(prompt)
            if len(ids) + 2 > first.max_context:
                raise SpectrtError(f"a prompt has {len(ids)} tokens, over the max context {first.max_context}")
            results = {m: d.generate(ids, max_new_tokens) for m, d in decoders.items()}
            if hf_generate is not None:
                tokens, seconds = hf_generate(ids, max_new_tokens)
                results["transformers"] = GenerationResult(len(ids), tokens, decode_s=seconds, steps=len(tokens) - 1)
            ref = results["ar"].tokens
            report.mismatches += sum(r.tokens != ref for r in results.values())
            for m, r in results.items():
                report.modes[m].add(r)
                report.categories[category or "all"][m].add(r)
            report.prompts += 1
    return report


def format_report(report: BenchReport) -> str:
    j = report.to_json()
    w = max([14] + [len(m) + 2 for m in j["modes"]])
    s = report.sampling
    how = "greedy" if s.greedy else f"sampling: temperature {s.temperature}, top-k {s.top_k}, top-p {s.top_p}, seed {s.seed}"
    if s.typical:
        how += "; typical acceptance: LOSSY, speculative outputs may differ from AR sampling"
    lines = [f"prompts: {j['prompts']}   output mismatches vs AR: {j['mismatches']}   ({how})", "",
             f"{'mode':<{w}}{'tok/s':>9}{'tau':>8}{'draft ms':>10}{'verify ms':>11}{'tokens':>8}"]
    for m, r in j["modes"].items():
        lines.append(f"{m:<{w}}{r['tok_s']:>9.2f}{r['tau']:>8.2f}{r['draft_ms_per_step']:>10.2f}"
                     f"{r['verify_ms_per_step']:>11.2f}{r['tokens']:>8}")
    for m, x in j.get("speedups", {}).items():
        lines.append(f"speedup {m} / ar: {x:.2f}x")
    specs = [m for m in j["modes"] if m.startswith("spec")]
    if len(j["categories"]) > 1 and specs:
        cw = [max(16, len(m) + 10) for m in specs]
        lines += ["", f"{'category':<16}{'ar tok/s':>10}" + "".join(f"{m + ' x / tau':>{c}}" for m, c in zip(specs, cw))]
        for c, ms in sorted(j["categories"].items()):
            ar = ms["ar"]["tok_s"]
            cells = "".join(f"{ms[m]['tok_s'] / ar:.2f}x / {ms[m]['tau']:.2f}".rjust(width) for m, width in zip(specs, cw))
            lines.append(f"{c:<16}{ar:>10.2f}{cells}")
    return "\n".join(lines)


def write_json(report: BenchReport, path) -> None:
    with open(path, "w") as f:
        json.dump(report.to_json(), f, indent=2)

