"""`spectrt generate DIR -p PROMPT`: greedy generation from an export (streamed, or --json stats)."""
from __future__ import annotations

import click

from spectrt.commands._common import IntRange, command, complete_profiles, to_json
from spectrt.profiles import load_profile
from spectrt.runtime.ort_runner import DEFAULT_PROVIDER, PROVIDERS
from spectrt.runtime.drafters import DRAFT_SOURCES
from spectrt.runtime.session import BACKENDS, DEFAULT_BACKEND, DEFAULT_DRAFT, DEFAULT_MAX_NEW_TOKENS


@command("generate", short_help="greedy generation from an exported directory")
@click.argument("artifact", metavar="DIR", type=click.Path(file_okay=False))
@click.option("-p", "--prompt", required=True,
              help="the prompt text (wrapped in the export's chat template unless --no-chat)")
@click.option("-n", "--max-new-tokens", type=IntRange(min=1), default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
              help="generate at most N new tokens (fewer at an end-of-sequence token or the context limit)")
@click.option("--mode", type=click.Choice(["spec", "ar"]), default=None,
              show_default="spec with draft heads or --draft lookup", help="speculative or autoregressive decoding")
@click.option("--tree", default=None, metavar="JSON", show_default="the export's",
              help="tree JSON (lists of top-k rank paths)")
@click.option("--draft", type=click.Choice(DRAFT_SOURCES), default=None,
              show_default=f"{DEFAULT_DRAFT} with draft heads, else none (AR)",
              help="speculative drafts: the export's heads, context lookup (n-gram copy from prompt + output, "
                   "no weights: spec mode even without heads), or both merged into one tree")
@click.option("--chat/--no-chat", default=True, help="wrap the prompt in the chat template (--no-chat: raw prompt)")
@click.option("--backend", type=click.Choice(sorted(BACKENDS)), default=DEFAULT_BACKEND,
              help="ort: ONNX Runtime graphs; trt: TensorRT engines from `spectrt build`")
@click.option("--profile", default=None, shell_complete=complete_profiles,
              help="device profile the TensorRT engines were built for")
@click.option("--provider", type=click.Choice(sorted(PROVIDERS)), default=DEFAULT_PROVIDER,
              help="ONNX Runtime execution provider")
@click.option("--max-context", type=IntRange(min=1), default=None, show_default="the export's",
              help="cap the KV cache (tokens)")
@click.option("--threads", type=IntRange(min=1), default=None, show_default="all cores",
              help="ONNX Runtime intra-op threads")
@click.option("--verify", is_flag=True,
              help="re-hash every file against the manifest's sha256 first (sizes are always checked)")
@click.option("--json", "json_out", is_flag=True, help="print machine-readable stats instead of streaming text")
def command(artifact, prompt, max_new_tokens, mode, tree, draft, chat, backend, profile, provider, max_context,
            threads, verify, json_out) -> int:
    """Greedy generation from DIR, the output of `spectrt export`: speculative decoding with the export's
    draft heads and/or context lookup, or autoregressive. Streams the text to stdout, or prints one JSON object with --json."""
    import sys

    from spectrt.runtime.session import SessionConfig, SpecSession

    profile = load_profile(profile).name if profile is not None else None  # a YAML path -> its name
    config = SessionConfig(backend=backend, profile=profile, provider=provider, max_context=max_context,
                           threads=threads, mode=mode, tree=tree, draft=draft, verify=verify)
    with SpecSession(artifact, config) as session:
        ids = session.codec.encode(prompt, chat=chat)
        if json_out:
            res = session.generate(ids, max_new_tokens)
            draft = session.draft if session.mode == "spec" else None
            print(to_json({**res.stats(), "mode": session.mode, "draft": draft,
                           "text": session.codec.decode(res.tokens)}))
        else:
            res = session.generate(ids, max_new_tokens, stream=sys.stdout.write)
            sys.stdout.write("\n")
            if res.stop_reason == "context":
                print(f"[stopped: context limit of {session.max_context} tokens reached]", file=sys.stderr)
    return 0
