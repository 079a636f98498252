"""`spectrt profiles [NAME|PATH]`: list the device profiles, or show one."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("profiles", help="list TensorRT device profiles, or show one",
                              description="List the built-in device profiles (Jetson Orin/Thor, desktop RTX), "
                                          "or show one by name or YAML path.")
    p.add_argument("name", nargs="?", help="profile name or path to a YAML file")
    p.add_argument("--artifact", metavar="DIR", help="also show the optimization profiles and memory estimate "
                                                     "for this exported artifact")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spectrt.profiles import list_profiles, load_profile

    if args.name is None:
        print(f"{'name':<16} {'device':<8} {'sm':<5} {'TRT':<6} {'precisions':<28} {'ctx':>6} {'tree':>5} "
              f"{'memory':>8}  description")
        for n in list_profiles():
            p = load_profile(n)
            print(f"{p.name:<16} {p.device:<8} {p.compute_capability:<5} {p.tensorrt:<6} "
                  f"{','.join(p.precisions):<28} {p.max_context:>6} {p.max_tree_nodes:>5} "
                  f"{p.memory_budget_mb:>6}MB  {p.description}")
        print("\nshow one: spectrt profiles NAME   (or a YAML path; `base: NAME` in it inherits a profile)")
        return 0
    p = load_profile(args.name)
    print(p.describe())
    if args.artifact:
        from spectrt.profiles import estimate_memory, graph_dims, optimization_profiles
        from spectrt.runtime.contract import GRAPHS
        from spectrt.runtime.manifest import load_artifact

        art = load_artifact(args.artifact)
        weights = sum(sum(g.get("bytes", {}).values()) for g in art.manifest["graphs"].values())
        mem = estimate_memory(p, art.model, weights, art.dtype, None, art.max_context)
        print(f"\nmemory estimate ({mem['precision']}): {mem['total_mb']:.0f} MiB of {mem['budget_mb']} MiB "
              f"(weights {mem['weights_mb']:.0f}, KV cache {mem['kv_cache_mb']:.0f}, I/O {mem['io_buffers_mb']:.0f}, "
              f"workspace {mem['workspace_mb']}){'' if mem['fits'] else '  -- OVER BUDGET'}")
        for g in art.manifest["graphs"]:
            if g not in GRAPHS:
                continue
            for sp in optimization_profiles(g, p, graph_dims(art, g), art.max_context):
                dims = ", ".join(f"{k} {v[0]}/{v[1]}/{v[2]}" for k, v in sp.dims.items())
                print(f"{g}.{sp.label}: min/opt/max {dims}")
    return 0
