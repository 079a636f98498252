"""`spectrt selftest DIR`: device acceptance in one command.

On the device: re-hash every file, check the tokenizer encodes the golden prompts to the golden ids, build
the TensorRT engines if they are missing, then per backend decode the golden prompts autoregressively and
speculatively and compare: speculative == autoregressive on each backend (must hold exactly), each
backend's ids vs the export's reference run (a divergence where the reference's top-1/top-2 margin is
below the near-tie threshold is reported, not failed), and the backends against each other. Times AR vs
speculative decoding. One JSON report and a PASS/FAIL line.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from spectrt.profiles.build import build_engines
from spectrt.profiles.device import load_profile
from spectrt.runtime.artifact import Artifact, engine_key, load_artifact
from spectrt.runtime.contract import BASE
from spectrt.runtime.engines import require_tensorrt, resolve_profile
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.golden import REFERENCE_RUN, TIE_MARGIN, TORCH_RUN, Golden, GoldenRun, compare, load_golden
from spectrt.runtime.session import SessionConfig, SpecSession
from spectrt.runtime.text import TextCodec

PRECISION_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "float16"}  # tie threshold per engine precision


def available_backends() -> tuple[str, ...]:
    """ort always; trt when a usable TensorRT (>= 10) imports here."""
    try:
        require_tensorrt()
    except SpectrtError:
        return ("ort",)
    return ("ort", "trt")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class SelftestReport:
    artifact: str
    checks: list[Check] = field(default_factory=list)
    backends: dict[str, dict] = field(default_factory=dict)
    cross_backend: dict[str, dict] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict:
        return {"artifact": self.artifact, "pass": self.passed,
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
                "backends": self.backends, "cross_backend": self.cross_backend}

    def verdict(self) -> str:
        failed = [c for c in self.checks if not c.ok]
        if not failed:
            return f"PASS ({len(self.checks)} checks)"
        return "FAIL: " + "; ".join(f"{c.name}: {c.detail}" for c in failed)


def _decode(art: Artifact, golden: Golden, config: SessionConfig) -> tuple[list[list[int]], float, int]:
    """Token ids per golden prompt, decode seconds and decoded tokens (the first token of each comes from prefill)."""
    tokens, seconds, count = [], 0.0, 0
    with SpecSession(art.root, config) as s:
        for ids in golden.prompt_ids:
            res = s.generate(list(ids), golden.max_new_tokens)
            tokens.append(list(res.tokens))
            seconds += res.decode_s
            count += max(len(res.tokens) - 1, 0)
    return tokens, seconds, count


def _trt_profile(art: Artifact, profile, progress) -> tuple[str, Artifact]:
    """The device profile name for the trt backend, building the engines first if any graph lacks one
    (then the artifact is re-read: its manifest holds the new engine records)."""
    if profile is not None:
        prof = load_profile(profile)
        name = prof.name
    else:
        name = resolve_profile(art, BASE.name)  # the only one built, or a clear error
        prof = load_profile(name)
    missing = [g for g in art.manifest.graphs if engine_key(g, name) not in art.manifest.engines]
    if missing:
        progress(f"building TensorRT engines for {', '.join(missing)} (profile {name})")
        build_engines(art.root, prof, graphs=missing, progress=progress)
        art = load_artifact(art.root)
    return name, art


def selftest(root, backends: tuple[str, ...] | None = None, profile=None, provider: str = "cpu",
             threads: int | None = None, progress=print) -> SelftestReport:
    """Run the device acceptance checks on the export ``root``; returns the report (``.passed``)."""
    art = load_artifact(root)
    report = SelftestReport(str(art.root))
    try:
        art.verify(hashes=True)
        report.checks.append(Check("files", True, f"{len(art.files())} files match their sha256"))
    except SpectrtError as e:
        report.checks.append(Check("files", False, str(e)))
        return report
    golden = load_golden(art)
    codec = TextCodec(art)
    bad = [i for i, (p, ids) in enumerate(zip(golden.prompts, golden.prompt_ids))
           if codec.encode(p, chat=False) != list(ids)]
    report.checks.append(Check("tokenizer", not bad, "encodes the golden prompts to the golden ids" if not bad else
                               f"prompt(s) {bad} encode differently here (tokenizers version?)"))
    backends = backends or available_backends()
    ar_tokens: dict[str, list[list[int]]] = {}
    for backend in backends:
        progress(f"[{backend}] decoding {len(golden.prompts)} golden prompts")
        name, dtype = None, art.dtype
        if backend == "trt":
            name, art = _trt_profile(art, profile, progress)
            dtype = PRECISION_DTYPE.get(art.manifest.engines[engine_key(BASE.name, name)].precision, "float16")
        base = SessionConfig(backend=backend, profile=name, provider=provider, threads=threads)
        ar, ar_s, ar_n = _decode(art, golden, dataclasses.replace(base, mode="ar"))
        ar_tokens[backend] = ar
        entry: dict = {"ar_tok_s": round(ar_n / ar_s, 2) if ar_s > 0 else None, "tie_margin": TIE_MARGIN[dtype]}
        if name:
            entry["profile"] = name
        ref = compare(ar, golden.reference, TIE_MARGIN[dtype])
        entry[REFERENCE_RUN] = ref.to_json()
        report.checks.append(Check(f"{backend}: ar == golden", not ref.clear,
                                   f"agreement {ref.agreement:.1%}, {len(ref.first)} near-tie divergence(s)"
                                   if not ref.clear else
                                   f"diverges at clear margins: " + ", ".join(
                                       f"prompt {p} token {i} (margin {m:.3g})" for p, i, m in ref.clear)))
        if TORCH_RUN in golden.runs:
            entry[TORCH_RUN] = compare(ar, golden.runs[TORCH_RUN], TIE_MARGIN[dtype]).to_json()  # for the record
        if art.draft is not None:
            spec, spec_s, spec_n = _decode(art, golden, dataclasses.replace(base, mode="spec"))
            same = [i for i, (a, b) in enumerate(zip(ar, spec)) if a == b]
            entry["spec_tok_s"] = round(spec_n / spec_s, 2) if spec_s > 0 else None
            entry["speedup"] = round(ar_s / spec_s * spec_n / max(ar_n, 1), 3) if spec_s > 0 and ar_n else None
            report.checks.append(Check(f"{backend}: speculative == ar", len(same) == len(ar),
                                       f"{len(same)}/{len(ar)} prompts identical"))
        report.backends[backend] = entry
    first = backends[0]
    for other in backends[1:]:
        mine = tuple(tuple(t) for t in ar_tokens[first])
        d = compare(ar_tokens[other], GoldenRun(mine, tuple((0.0,) * len(t) for t in mine)), float("inf"))
        report.cross_backend[f"{other} vs {first}"] = d.to_json()
    return report


__all__ = ["SelftestReport", "available_backends", "selftest"]
