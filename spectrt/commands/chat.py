"""`spectrt chat DIR`: an interactive conversation in the terminal, streamed, on the Python API."""
from __future__ import annotations

import click

from spectrt.commands._common import IntRange, command
from spectrt.commands._model import load_model, model_options
from spectrt.runtime.session import DEFAULT_MAX_NEW_TOKENS

HELP = "/reset: forget the conversation, /exit (or Ctrl-D): quit, Ctrl-C: stop a reply"


def fit(model, messages: list[dict], system: list[dict]) -> tuple[list[int], int]:
    """Token ids of the conversation, dropping the oldest turns until it leaves room for a reply. Returns
    the ids and how many messages were dropped (the newest user message is never dropped)."""
    dropped = 0
    while True:
        ids = model.encode(system + messages)
        if len(ids) < model.max_context or len(messages) <= 1:
            return ids, dropped
        del messages[:2 if len(messages) > 2 else 1]
        dropped += 2


@command("chat", short_help="interactive chat in the terminal (streamed)")
@click.argument("artifact", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--system", "system_prompt", default=None, metavar="PROMPT",
              help="a system message at the start of the conversation")
@click.option("-n", "--max-new-tokens", type=IntRange(min=1), default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
              help="at most N new tokens per reply")
@model_options
def command(artifact, system_prompt, max_new_tokens, **options) -> int:
    """Chat with DIR, the output of `spectrt export`, in the terminal: type a message, the reply streams
    back (greedy, or sampling with --temperature). /reset forgets the conversation, /exit or Ctrl-D quits,
    Ctrl-C stops a reply.

    The KV cache is kept between turns: each turn prefills only its new tokens; when the conversation
    outgrows the context, the oldest turns are dropped (and the cache is rebuilt from there)."""
    import sys

    from spectrt.runtime.errors import SpectrtError

    interactive = sys.stdin.isatty()
    with load_model(artifact, **options) as model:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages: list[dict] = []
        if interactive:
            print(f"spectrt chat: {model.name} ({model.mode}, context {model.max_context} tokens). {HELP}",
                  file=sys.stderr)
        while True:
            try:
                line = input(">>> " if interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                print(file=sys.stderr)
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit", "/bye"):
                break
            if text == "/reset":
                messages.clear()
                print("[conversation reset]", file=sys.stderr)
                continue
            if text in ("/help", "/?"):
                print(HELP, file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
            try:
                ids, dropped = fit(model, messages, system)
                stream = model.stream(ids, max_new_tokens)
            except SpectrtError as e:
                print(f"[error: {e}]", file=sys.stderr)
                messages.pop()
                continue
            if dropped:
                print(f"[context full: dropped the {dropped} oldest messages]", file=sys.stderr)
            try:
                for piece in stream:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                stream.close()
                print("\n[stopped]", file=sys.stderr)
            sys.stdout.write("\n")
            sys.stdout.flush()
            c = stream.completion
            messages.append({"role": "assistant", "content": c.text if c else ""})
            if c is not None and c.stop_reason == "context":
                print(f"[stopped: context limit of {model.max_context} tokens reached]", file=sys.stderr)
    return 0
