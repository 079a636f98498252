"""What every `spectrt` subcommand shares: the command class that turns SpectrtError into one line and
exit status 2, range-checked number types with plain messages, option completion, strict JSON.

Besides click and the standard library only torch-free runtime/profiles modules are imported here (the
option groups need their defaults): loading a command never loads torch, transformers or onnx.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import click

from spectrt.profiles.device import list_profiles, load_profile
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.ort_runner import DEFAULT_PROVIDER, PROVIDERS
from spectrt.runtime.sampling import GREEDY, SamplingConfig
from spectrt.runtime.drafters import DRAFT_SOURCES
from spectrt.runtime.session import BACKENDS, DEFAULT_BACKEND
from spectrt.runtime.tree import TREE_DYNAMIC


def one_line(message) -> str:
    """``message`` with its line breaks (and the indentation after them) folded into single spaces."""
    return re.sub(r"\s*\n\s*", " ", str(message)).strip()


class CommandFailed(click.ClickException):
    """A command stopped on a user-facing error: printed as one line to stderr, no traceback."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(self.message, file=file, err=True)


class SpectrtCommand(click.Command):
    """A subcommand: SpectrtError -> `spectrt <command>: error: <message>` (exit 2); Ctrl-C -> exit 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SpectrtError as e:
            raise CommandFailed(f"{ctx.command_path}: error: {one_line(e)}") from e
        except KeyboardInterrupt:
            raise CommandFailed(f"{ctx.command_path}: interrupted", 130) from None


class SpectrtGroup(click.Group):
    """A group run without a subcommand prints its help to stderr and exits 2 (as click >= 8.2 does; 8.1
    exited 0)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            click.echo(ctx.get_help(), err=True, color=ctx.color)
            ctx.exit(2)
        return super().parse_args(ctx, args)


def command(name: str, **kwargs):
    """``click.command`` with :class:`SpectrtCommand` and defaults shown in the help."""
    kwargs.setdefault("context_settings", {}).setdefault("show_default", True)
    return click.command(name, cls=SpectrtCommand, **kwargs)


# ----------------------------------------------------------------------------- ranged numbers

class OutOfRange(click.BadParameter):
    """``--heads must be at least 1, not 0``: the message names the option, no "Invalid value for" prefix."""

    def format_message(self) -> str:
        return self.message


def _option_name(param) -> str:
    opts = getattr(param, "opts", None) or [getattr(param, "human_readable_name", "value")]
    return "/".join(opts)


def _bounds(r) -> str:
    lo, hi = r.min, r.max
    if hi is None:
        return f"{'greater than' if r.min_open else 'at least'} {lo}"
    if lo is None:
        return f"{'less than' if r.max_open else 'at most'} {hi}"
    return f"in {'(' if r.min_open else '['}{lo}, {hi}{')' if r.max_open else ']'}"


class _RangeMixin:
    base: click.ParamType

    def convert(self, value, param, ctx):
        number = self.base.convert(value, param, ctx)  # not a number: click's own message
        lo_bad = self.min is not None and (number <= self.min if self.min_open else number < self.min)
        hi_bad = self.max is not None and (number >= self.max if self.max_open else number > self.max)
        if lo_bad or hi_bad:
            raise OutOfRange(f"{_option_name(param)} must be {_bounds(self)}, not {value}", ctx, param)
        return number


class IntRange(_RangeMixin, click.IntRange):
    """click.IntRange (the help shows ``x>=1``) whose error reads ``--stride must be at least 1, not 0``."""

    base = click.INT


class FloatRange(_RangeMixin, click.FloatRange):
    base = click.FLOAT


class CommaList(click.ParamType):
    """``a,b`` -> ["a", "b"]; with ``multiple=True`` the option may also repeat (see :func:`flatten`)."""

    name = "NAME[,NAME...]"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            self.fail("needs at least one name", param, ctx)
        return items


def flatten(lists) -> list[str] | None:
    """The values of a ``multiple=True`` CommaList option, or None when it was not given."""
    return [v for part in lists for v in part] or None


def complete_profiles(ctx, param, incomplete: str):
    """Shell completion of device profile names."""
    return [n for n in list_profiles() if n.startswith(incomplete)]


# ----------------------------------------------------------------------------- option groups

def _apply(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


decoding_options = _apply([
    click.option("--mode", type=click.Choice(["spec", "ar"]), default=None,
                 show_default="spec with draft heads or --draft lookup", help="speculative or autoregressive decoding"),
    click.option("--tree", default=None, metavar="JSON|dynamic", show_default="the export's",
                 help=f"the heads' tree: a JSON of top-k rank paths, or '{TREE_DYNAMIC}': a tree grown each step from "
                      "the heads' own probabilities (EAGLE-2 style) under --tree-nodes"),
    click.option("--tree-nodes", type=IntRange(min=1), default=None, metavar="N",
                 show_default="the export's node budget", help=f"node budget (root included) of --tree {TREE_DYNAMIC}"),
    click.option("--draft", type=click.Choice(DRAFT_SOURCES), default=None,
                 show_default="all the export has (heads, lookup, corpus) with draft heads, else none (AR)",
                 help="speculative drafts: the export's heads, context lookup (n-gram copy from prompt + output, "
                      "no weights: spec mode even without heads), the export's corpus table (n-grams of the model's "
                      "own answers), or several merged into one tree"),
    click.option("--max-context", type=IntRange(min=1), default=None, show_default="the export's",
                 help="cap the KV cache (tokens: prompt + output)"),
])


def backend_options(threads_help: str = "ONNX Runtime intra-op threads"):
    """--backend, --profile, --provider, --threads, --verify: where and how an export runs (generate, bench,
    chat, serve). :func:`profile_name` turns --profile into the engines' key."""
    return _apply([
        click.option("--backend", type=click.Choice(sorted(BACKENDS)), default=DEFAULT_BACKEND,
                     help="ort: ONNX Runtime graphs; trt: TensorRT engines from `spectrt build`"),
        click.option("--profile", default=None, shell_complete=complete_profiles,
                     help="device profile (name or YAML) the TensorRT engines were built for"),
        click.option("--provider", type=click.Choice(sorted(PROVIDERS)), default=DEFAULT_PROVIDER,
                     help="ONNX Runtime execution provider"),
        click.option("--threads", type=IntRange(min=1), default=None, show_default="all cores", help=threads_help),
        click.option("--verify", is_flag=True,
                     help="re-hash every file against the manifest's sha256 first (sizes are always checked)"),
    ])


def profile_name(profile) -> str | None:
    """--profile's engine key: a built-in name, or a YAML path resolved to the profile's name."""
    return load_profile(profile).name if profile is not None else None


sampling_options = _apply([
    click.option("--temperature", type=FloatRange(min=0), default=GREEDY.temperature,
                 help="sampling temperature; 0: greedy. Speculative output equals AR output for the same --seed"),
    click.option("--top-k", type=IntRange(min=0), default=GREEDY.top_k, help="sample from the k most likely tokens; 0: all"),
    click.option("--top-p", type=FloatRange(0, 1, min_open=True), default=GREEDY.top_p,
                 help="sample from the smallest set of tokens holding this probability mass; 1: all"),
    click.option("--seed", type=IntRange(0, 2**64 - 1), default=GREEDY.seed, help="sampling seed"),
    click.option("--typical", is_flag=True,
                 help="LOSSY: Medusa's typical acceptance (accept drafted tokens the base finds likely enough; more "
                      "tokens per step, but the output is no longer what AR sampling gives)"),
])


def sampling_config(temperature: float, top_k: int, top_p: float, seed: int, typical: bool = False) -> SamplingConfig:
    return SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, typical=typical)


# ----------------------------------------------------------------------------- strict JSON

def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _scalar(obj):
    if hasattr(obj, "item"):  # numpy scalars
        return _finite(obj.item())
    if hasattr(obj, "tolist"):  # numpy arrays
        return _finite(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def to_json(obj, indent: int | None = None) -> str:
    """RFC 8259 JSON: NaN and +-Infinity become null (Python's json would write bare NaN/Infinity)."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False, default=_scalar)


def write_json(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(obj, indent=2) + "\n")
    return path
