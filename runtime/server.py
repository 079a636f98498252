"""An OpenAI-compatible local server for one :class:`~spectrt.runtime.api.Model` (Starlette; `spectrt serve`).

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON, or server-sent events with
``"stream": true``, ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /v1/models/{id}`` and
``GET /health`` (never needs the key).

* One model, batch 1: generations run one at a time on a single worker thread, in arrival order; at most
  ``max_queue`` requests wait (503 beyond that).
* A client that disconnects stops its generation after the current decoding step (or before it starts).
* Errors are OpenAI-shaped JSON, ``{"error": {"message", "type", "param", "code"}}``: 400 bad request
  (wrong types or ranges, ``max_tokens`` < 1, a prompt longer than the context), 401 missing or wrong API key, 404 unknown model or route, 405, 413 body over
  ``max_body`` bytes, 503 queue full, 500 a failure inside the runtime.
* ``max_tokens`` (or ``max_completion_tokens``) is capped by the context left after the prompt and by
  ``max_tokens_limit``; absent, it is that cap.
* Sampling: ``temperature``, ``top_p``, ``top_k``, ``seed`` (runtime.sampling: speculative output equals AR
  sampling's for a seed). Absent ``temperature`` is the model's default (greedy unless the server was
  started with --temperature; OpenAI's default is 1); a sampled request without ``seed`` gets a random one,
  returned in the response's ``spectrt.seed``. ``n`` must be 1; penalties, logit_bias, logprobs, tools and
  JSON mode are refused.
* Conversations: the KV cache is kept between requests; a request prefills only the tokens after the
  longest prefix it shares with the previous request's prompt + output (a chat's next turn).

Starlette is imported here, so this module needs the ``serve`` extra; ``spectrt.runtime`` never imports it.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from spectrt.runtime.api import (MAX_STOP_STRINGS, Completion, ContextLengthError, Model, normalize_messages,
                                 sampling_config)
from spectrt.runtime.sampling import SamplingConfig
from spectrt.runtime.errors import SpectrtError

log = logging.getLogger("spectrt.server")

DEFAULT_MAX_BODY = 1 << 20  # bytes of a request body
DEFAULT_MAX_QUEUE = 64  # requests waiting for the worker (running one excluded)
CANCEL_POLL_S = 0.2  # how often a non-streaming request checks whether its client is still there


class ApiError(Exception):
    """An error response: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ----------------------------------------------------------------------------- request parsing

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _unsupported(body: dict, name: str, ok) -> None:
    if name in body and body[name] is not None and not ok(body[name]):
        raise bad(f"'{name}' is not supported by this server (value {json.dumps(body[name])[:80]})", name,
                  "unsupported_parameter")


class Params:
    """What a request asks for, checked: prompt, token budget, stop strings, streaming."""

    def __init__(self, body: dict, chat: bool, default_sampling: SamplingConfig):
        self.stream = body.get("stream", False)
        if not isinstance(self.stream, bool) and self.stream is not None:
            raise bad("'stream' must be a boolean", "stream")
        self.stream = bool(self.stream)
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        self.include_usage = bool((opts or {}).get("include_usage", False))
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        self.max_tokens = body.get(name)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad(f"'{name}' must be an integer >= 1, not {json.dumps(self.max_tokens)}", name,
                      "integer_below_min_value" if _is_int(self.max_tokens) else "invalid_type")
        stop = body.get("stop")
        if stop is not None and not (isinstance(stop, str) or (
                isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) for s in stop))):
            raise bad(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
        self.stop = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s] or None
        self.sampling = {k: body[k] for k in ("temperature", "top_p", "top_k", "seed") if body.get(k) is not None}
        try:
            cfg = sampling_config(default_sampling, **self.sampling)
        except SpectrtError as e:
            raise bad(str(e), next((k for k in self.sampling if k in str(e)), None)) from None
        if not cfg.greedy and "seed" not in self.sampling:
            self.sampling["seed"] = secrets.randbits(63)  # OpenAI: unseeded requests differ
        n = body.get("n")
        if n is not None and n != 1:
            raise bad("'n' must be 1: this server returns one choice per request", "n", "unsupported_value")
        for k in ("presence_penalty", "frequency_penalty"):
            _unsupported(body, k, lambda v: _is_number(v) and v == 0)
        _unsupported(body, "logit_bias", lambda v: v == {})
        if chat:
            _unsupported(body, "logprobs", lambda v: v is False)
            _unsupported(body, "top_logprobs", lambda v: v == 0)
            for k in ("tools", "functions"):
                _unsupported(body, k, lambda v: v == [])
            _unsupported(body, "tool_choice", lambda v: v == "none")
            _unsupported(body, "function_call", lambda v: v == "none")
            _unsupported(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text")
            if "messages" not in body:
                raise bad("'messages' is a required property", "messages", "missing_required_parameter")
            try:
                self.prompt = normalize_messages(body["messages"])
            except SpectrtError as e:
                raise bad(str(e), "messages") from None
        else:
            _unsupported(body, "logprobs", lambda v: v == 0)
            _unsupported(body, "echo", lambda v: v is False)
            _unsupported(body, "suffix", lambda v: v == "")
            _unsupported(body, "best_of", lambda v: v == 1)
            if "prompt" not in body:
                raise bad("'prompt' is a required property", "prompt", "missing_required_parameter")
            p = body["prompt"]
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
                p = p[0]  # a batch of one prompt
            if isinstance(p, str):
                if not p:
                    raise bad("'prompt' is empty", "prompt")
            elif not (isinstance(p, list) and p and all(_is_int(t) for t in p)):
                raise bad("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")
            self.prompt = p


async def _read_json(request: Request, max_body: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise bad("bad Content-Length header")
        if int(length) > max_body:
            raise ApiError(413, f"the request body has {length} bytes; this server takes at most {max_body}",
                           code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise ApiError(413, f"the request body is over {max_body} bytes, this server's limit",
                               code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected while sending the request") from None
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


# ----------------------------------------------------------------------------- the worker

class Job:
    """One generation: runs on the worker thread; ``cancel`` stops it after the current step."""

    def __init__(self, ids: list[int], max_new: int | None, stop, sampling: dict):
        self.ids, self.max_new, self.stop, self.sampling = ids, max_new, stop, sampling
        self.cancel = threading.Event()
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())


class Worker:
    """Runs jobs one at a time (batch 1) on one thread, in arrival order, and keeps a short record."""

    def __init__(self, model: Model, max_queue: int):
        self.model, self.max_queue = model, max_queue
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spectrt-generate")
        self.pending = 0  # submitted and not finished (the running one included)
        self.recent: collections.deque = collections.deque(maxlen=256)  # finished jobs, newest last
        self.running: set[Job] = set()

    def submit(self, job: Job, on_text=None) -> asyncio.Future:
        if self.pending > self.max_queue:
            raise ApiError(503, f"the server is busy ({self.pending} requests queued); retry later",
                           type="server_error", code="server_busy", headers={"Retry-After": "1"})
        self.pending += 1
        self.running.add(job)
        fut = asyncio.get_running_loop().run_in_executor(self.executor, partial(self._run, job, on_text))
        fut.add_done_callback(lambda _: self._finished(job))
        return fut

    def _run(self, job: Job, on_text) -> Completion:
        t0 = time.perf_counter()
        c = self.model.generate(job.ids, job.max_new, job.stop, on_text=on_text, should_stop=job.cancel.is_set,
                                **job.sampling)
        record = {"id": job.id, "prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.tokens),
                  "max_tokens": job.max_new, "stop_reason": c.stop_reason,
                  "seconds": round(time.perf_counter() - t0, 4)}
        self.recent.append(record)
        log.info("%s: %d prompt + %d new tokens (max %s), %s, %.3f s", job.id, c.prompt_tokens, len(c.tokens),
                 job.max_new or "context", c.stop_reason, record["seconds"])
        return c

    def _finished(self, job: Job) -> None:
        self.pending -= 1
        self.running.discard(job)

    def shutdown(self) -> None:
        for job in list(self.running):
            job.cancel.set()
        self.executor.shutdown(wait=True, cancel_futures=True)


class _EventStream(StreamingResponse):
    """Server-sent events; ``on_close`` runs however the response ends (done, client gone, server stop)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except (OSError, ClientDisconnect):  # the client went away mid-stream (ASGI 2.4 servers)
            pass
        finally:
            self.on_close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------- the app

def create_app(model: Model, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY,
               max_tokens_limit: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE) -> Starlette:
    """The Starlette app serving ``model`` (which the caller keeps and closes). ``api_key``: when set, every
    /v1 request needs ``Authorization: Bearer <api_key>``."""
    worker = Worker(model, max_queue)
    expected = f"Bearer {api_key}".encode() if api_key else None

    def authorize(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            message = "incorrect API key provided" if given else "missing API key (Authorization: Bearer <key>)"
            raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise bad("'model' must be a string", "model")
        if name is not None and name != model.name:
            raise ApiError(404, f"The model `{name}` does not exist (this server serves `{model.name}`)",
                           param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": model.name, "object": "model", "created": created, "owned_by": "spectrt",
                "max_context": model.max_context, "mode": model.mode}

    created = int(time.time())

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": model.name, "queued": worker.pending})

    async def list_models(request: Request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request):
        authorize(request)
        if request.path_params["model"] != model.name:
            raise ApiError(404, f"The model `{request.path_params['model']}` does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(model_card())

    async def prepare(request: Request, chat: bool) -> tuple[Params, Job]:
        authorize(request)
        body = await _read_json(request, max_body)
        check_model(body)
        params = Params(body, chat, model.sampling)
        try:
            ids = await run_in_threadpool(model.encode, params.prompt, chat)  # /v1/completions: no template
            model.check_prompt(ids)
        except ContextLengthError as e:
            raise bad(str(e), "messages" if chat else "prompt", "context_length_exceeded") from None
        except SpectrtError as e:
            raise bad(str(e), "messages" if chat else "prompt") from None
        # None: up to the context limit (the decoder stops there: finish_reason "length")
        max_new = min((x for x in (params.max_tokens, max_tokens_limit) if x is not None), default=None)
        return params, Job(ids, max_new, params.stop, params.sampling)

    async def complete(request: Request, chat: bool):
        params, job = await prepare(request, chat)
        if params.stream:
            return stream(params, job, chat)
        fut = worker.submit(job)
        while True:  # a client that hangs up stops its generation
            done, _ = await asyncio.wait({fut}, timeout=CANCEL_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                job.cancel.set()
        try:
            c = fut.result()
        except SpectrtError as e:
            raise ApiError(500, f"generation failed: {e}", type="server_error") from None
        choice = {"index": 0, "finish_reason": c.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        return JSONResponse({"id": ("chatcmpl-" if chat else "cmpl-") + job.id,
                             "object": "chat.completion" if chat else "text_completion", "created": job.created,
                             "model": model.name, "choices": [choice], "usage": c.usage,
                             "spectrt": {**c.stats, **({"seed": job.sampling["seed"]} if "seed" in job.sampling else {})}})

    def stream(params: Params, job: Job, chat: bool):
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        fut = worker.submit(job, on_text=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
        end = object()
        fut.add_done_callback(lambda _: pieces.put_nowait(end))
        base = {"id": ("chatcmpl-" if chat else "cmpl-") + job.id,
                "object": "chat.completion.chunk" if chat else "text_completion", "created": job.created,
                "model": model.name}

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                if role:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice]}

        async def events():
            try:
                if chat:
                    yield _sse(chunk("", role=True))
                while (piece := await pieces.get()) is not end:
                    yield _sse(chunk(piece))
                try:
                    c = fut.result()
                except Exception as e:  # headers are sent: the error goes in the stream
                    if not isinstance(e, SpectrtError):
                        log.exception("generation failed")
                    yield _sse({"error": {"message": f"generation failed: {e}", "type": "server_error",
                                          "param": None, "code": None}})
                    return
                yield _sse(chunk(None, c.finish_reason))
                if params.include_usage:
                    yield _sse({**base, "choices": [], "usage": c.usage})
                yield "data: [DONE]\n\n"
            finally:
                job.cancel.set()  # no-op once finished; otherwise the client is gone

        return _EventStream(events(), on_close=job.cancel.set)

    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    async def completions(request: Request):
        return await complete(request, chat=False)

    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    async def http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), code={404: "not_found", 405: "method_not_allowed"}
                              .get(exc.status_code), headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception):
        log.exception("internal error")
        return error_response(500, f"internal server error: {type(exc).__name__}", type="server_error")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.shutdown()  # running and queued generations stop

    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ], exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
        lifespan=lifespan)
    app.state.model, app.state.worker = model, worker
    return app
