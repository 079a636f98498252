"""`spectrt generate DIR -p PROMPT`: generation from an export, greedy or seeded sampling (streamed, or --json stats)."""
from __future__ import annotations

import click

from spectrt.commands._common import (IntRange, backend_options, command, decoding_options, profile_name,
                                     sampling_config, sampling_options, to_json)
from spectrt.runtime.session import DEFAULT_MAX_NEW_TOKENS, SessionConfig, SpecSession


@command("generate", short_help="generation from an exported directory (greedy or seeded sampling)")
@click.argument("artifact", metavar="DIR", type=click.Path(file_okay=False))
@click.option("-p", "--prompt", required=True,
              help="the prompt text (wrapped in the export's chat template unless --no-chat)")
@click.option("-n", "--max-new-tokens", type=IntRange(min=1), default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
              help="generate at most N new tokens (fewer at an end-of-sequence token or the context limit)")
@decoding_options
@click.option("--chat/--no-chat", default=True, help="wrap the prompt in the chat template (--no-chat: raw prompt)")
@backend_options()
@sampling_options
@click.option("--json", "json_out", is_flag=True, help="print machine-readable stats instead of streaming text")
def command(artifact, prompt, max_new_tokens, mode, tree, draft, max_context, chat, backend, profile, provider, threads,
            verify, temperature, top_k, top_p, seed, typical, json_out) -> int:
    """Generation from DIR, the output of `spectrt export`: speculative decoding with the export's draft heads
    and/or context lookup, or autoregressive; greedy, or sampling with --temperature (speculative output is
    token for token the autoregressive output for the same --seed). Streams the text to stdout, or prints
    one JSON object with --json."""
    import sys

    config = SessionConfig(backend=backend, profile=profile_name(profile), provider=provider, max_context=max_context,
                           threads=threads, mode=mode, tree=tree, draft=draft, verify=verify,
                           sampling=sampling_config(temperature, top_k, top_p, seed, typical))
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
