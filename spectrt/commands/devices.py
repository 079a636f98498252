"""`spectrt devices [NAME|PATH]`: list the TensorRT device profiles, or show one (was `spectrt profiles`)."""
from __future__ import annotations

from typing import NamedTuple

import click

from spectrt.commands._common import command, complete_profiles


class _ExportFacts(NamedTuple):
    model: object  # the manifest's ModelInfo (dims for the KV cache estimate)
    weight_bytes: int  # of every graph's files
    dtype: str
    max_context: int
    graph_dims: dict  # contract graph name -> its fixed dims
    quantized: bool  # low-bit weights in the graphs (export --weights)


def _export_facts(path: str) -> _ExportFacts:
    """What the memory estimate and the optimization profiles need from an export: this command's only
    manifest read."""
    from spectrt.runtime.artifact import load_artifact
    from spectrt.runtime.contract import GRAPHS

    art = load_artifact(path)
    graphs = art.manifest.graphs
    return _ExportFacts(art.model, sum(g.bytes for g in graphs.values()), art.dtype, art.max_context,
                        {g: art.dims(g) for g in graphs if g in GRAPHS}, art.manifest.weights is not None)


@command("devices", short_help="list TensorRT device profiles, or show one")
@click.argument("name", required=False, shell_complete=complete_profiles)
@click.option("--artifact", default=None, metavar="DIR", type=click.Path(file_okay=False),
              help="also show the optimization profiles and memory estimate for this exported artifact")
@click.pass_context
def command(ctx, name, artifact) -> int:
    """List the built-in device profiles (Jetson Orin/Thor, desktop RTX), or show the one called NAME
    (or the YAML file at NAME; `base: NAME` in it inherits a built-in profile)."""
    from spectrt.profiles import list_profiles, load_profile

    if name is None:
        if artifact:
            raise click.UsageError("--artifact needs a profile NAME", ctx)
        print(f"{'name':<16} {'device':<8} {'sm':<5} {'TRT':<6} {'precisions':<28} {'ctx':>6} {'tree':>5} "
              f"{'memory':>8}  description")
        for n in list_profiles():
            p = load_profile(n)
            print(f"{p.name:<16} {p.device:<8} {p.compute_capability:<5} {p.tensorrt:<6} "
                  f"{','.join(p.precisions):<28} {p.max_context:>6} {p.max_tree_nodes:>5} "
                  f"{p.memory_budget_mb:>6}MB  {p.description}")
        print("\nshow one: spectrt devices NAME   (or a YAML path; `base: NAME` in it inherits a profile)")
        return 0
    p = load_profile(name)
    print(p.describe())
    if artifact:
        from spectrt.profiles import estimate_memory, optimization_profiles

        facts = _export_facts(artifact)
        mem = estimate_memory(p, facts.model, facts.weight_bytes, facts.dtype, None, facts.max_context,
                              quantized=facts.quantized)
        print(f"\nmemory estimate ({mem['precision']}): {mem['total_mb']:.0f} MiB of {mem['budget_mb']} MiB "
              f"(weights {mem['weights_mb']:.0f}, KV cache {mem['kv_cache_mb']:.0f}, I/O {mem['io_buffers_mb']:.0f}, "
              f"workspace {mem['workspace_mb']}){'' if mem['fits'] else '  -- OVER BUDGET'}")
        for g, dims in facts.graph_dims.items():
            for sp in optimization_profiles(g, p, dims, facts.max_context):
                d = ", ".join(f"{k} {v[0]}/{v[1]}/{v[2]}" for k, v in sp.dims.items())
                print(f"{g}.{sp.label}: min/opt/max {d}")
    return 0
