"""`spectrt serve DIR`: an OpenAI-compatible local server (needs the `serve` extra: starlette, uvicorn)."""
from __future__ import annotations

import click

from spectrt.commands._common import IntRange, command
from spectrt.commands._model import load_model, model_options

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY = 1 << 20  # = spectrt.runtime.server.DEFAULT_MAX_BODY (not imported: starlette is optional)
DEFAULT_MAX_QUEUE = 64


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int):
    """A bound (not yet listening) socket, so a busy port or bad host is one line and exit 2."""
    import socket

    from spectrt.runtime.errors import SpectrtError

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise SpectrtError(f"cannot listen on {host}:{port} ({e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise SpectrtError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


@command("serve", short_help="OpenAI-compatible local server (/v1/chat/completions, /v1/completions)")
@click.argument("artifact", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--host", default=DEFAULT_HOST,
              help="address to listen on; the default is this machine only (0.0.0.0: every network, your choice)")
@click.option("--port", type=IntRange(min=0, max=65535), default=DEFAULT_PORT, help="TCP port (0: any free port)")
@click.option("--api-key", default=None, envvar="SPECTRT_API_KEY", show_envvar=True,
              help="require 'Authorization: Bearer KEY' on /v1 requests (401 without it); /health stays open")
@click.option("--model-name", default=None, show_default="DIR's name", help="the model id clients name")
@click.option("--max-tokens", type=IntRange(min=1), default=None, show_default="the context left after the prompt",
              help="cap on new tokens per request (a request's max_tokens is capped to it)")
@click.option("--max-body", type=IntRange(min=1), default=DEFAULT_MAX_BODY, metavar="BYTES",
              help="largest request body (413 above)")
@click.option("--max-queue", type=IntRange(min=0), default=DEFAULT_MAX_QUEUE, metavar="N",
              help="requests that may wait while one generates (503 above)")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              help="server log level (info: one line per request)")
@model_options
def command(artifact, host, port, api_key, model_name, max_tokens, max_body, max_queue, log_level,
            **options) -> int:
    """Serve DIR, the output of `spectrt export`, over an OpenAI-compatible HTTP API: POST
    /v1/chat/completions and /v1/completions (streaming with "stream": true), GET /v1/models and /health.

    One model, one generation at a time (requests queue, batch 1); a client that disconnects stops its
    generation. Greedy by default (--temperature sets the default); requests may sample with temperature,
    top_p, top_k and seed (seeded speculative output equals seeded AR output). The KV cache is kept between
    requests: a chat's next turn prefills only its new tokens. Any OpenAI client works, e.g.
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")."""
    import logging
    import sys

    from spectrt.runtime.errors import SpectrtError

    try:
        import uvicorn

        from spectrt.runtime.server import create_app
    except ImportError as e:
        raise SpectrtError(f"spectrt serve needs the serve extra ({e.name} is missing): "
                           "pip install 'spectrt[serve]'") from None
    sock = bind(host, port)
    try:
        with load_model(artifact, name=model_name, **options) as model:
            app = create_app(model, api_key=api_key, max_body=max_body, max_tokens_limit=max_tokens,
                             max_queue=max_queue)
            logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
            port = sock.getsockname()[1]
            url_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
            print(f"spectrt serve: {model.name} ({model.mode}, context {model.max_context} tokens) on "
                  f"http://{url_host}:{port}/v1{'' if api_key else ' (no API key)'}", file=sys.stderr, flush=True)
            if not is_loopback(host) and not api_key:
                print(f"spectrt serve: warning: listening on {host} without --api-key: anyone who can reach "
                      "this machine can use the model", file=sys.stderr, flush=True)
            config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3, access_log=False)
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
