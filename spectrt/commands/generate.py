"""`spectrt generate DIR -p PROMPT`: generation from an export, greedy or seeded sampling (streamed, or --json
stats); a thin layer over the Python API (`spectrt.load`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from spectrt.commands._common import IntRange, command, to_json
from spectrt.commands._model import load_model, model_options
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.session import DEFAULT_MAX_NEW_TOKENS


def read_messages(path: str) -> list:
    """A JSON file (or - for stdin) holding a list of {"role", "content"} messages (checked by the API)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        messages = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpectrtError(f"{path}: cannot read a messages JSON ({e.__class__.__name__}: {e})") from None
    if isinstance(messages, dict) and "messages" in messages:  # an OpenAI-style request body
        messages = messages["messages"]
    return messages


@command("generate", short_help="generation from an exported directory (greedy or seeded sampling)")
@click.argument("artifact", metavar="DIR", type=click.Path(file_okay=False))
@click.option("-p", "--prompt", default=None, show_default="required unless --messages",
              help="the prompt text (wrapped in the export's chat template unless --no-chat)")
@click.option("--messages", "messages_file", default=None, metavar="JSON",
              help="a conversation instead of -p: a JSON file (- for stdin) with a list of {role, content} "
                   "messages, or an object with 'messages'")
@click.option("-n", "--max-new-tokens", type=IntRange(min=1), default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
              help="generate at most N new tokens (fewer at an end-of-sequence token or the context limit)")
@click.option("--chat/--no-chat", default=True, help="wrap the prompt in the chat template (--no-chat: raw prompt)")
@model_options
@click.option("--json", "json_out", is_flag=True, help="print machine-readable stats instead of streaming text")
@click.pass_context
def command(ctx, artifact, prompt, messages_file, max_new_tokens, chat, json_out, **options) -> int:
    """Generation from DIR, the output of `spectrt export`: speculative decoding with the export's draft heads
    and/or context lookup, or autoregressive; greedy, or sampling with --temperature (speculative output is
    token for token the autoregressive output for the same --seed). Streams the text to stdout, or prints
    one JSON object with --json."""
    if (prompt is None) == (messages_file is None):
        raise click.UsageError("give the prompt with -p/--prompt or a conversation with --messages (one of them)", ctx)
    source = read_messages(messages_file) if messages_file is not None else prompt
    with load_model(artifact, **options) as model:
        if json_out:
            c = model.generate(source, max_new_tokens, chat=chat)
            draft = model.session.draft if model.mode == "spec" else None
            print(to_json({**c.stats, "mode": model.mode, "draft": draft, "text": c.text}))
        else:
            stream = model.stream(source, max_new_tokens, chat=chat)
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            if stream.completion is not None and stream.completion.stop_reason == "context":
                print(f"[stopped: context limit of {model.max_context} tokens reached]", file=sys.stderr)
    return 0
