"""`spectrt serve`: the OpenAI-compatible server, driven by the official `openai` client against a uvicorn
server on loopback (tiny random export): outputs identical to Model.generate, streaming, errors, API key,
8 concurrent clients, a client hanging up mid-stream, body limits, and the CLI."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

KEY = "test-key"
MAX_BODY = 16 * 1024
PROMPTS = ["Tell me a story", "The quick brown fox", "abc", "Hello there, how are you?", "1 2 3 4", "Why?",
           "zzz", "What is the capital of France?"]


@pytest.fixture(scope="module")
def tiny_export(tiny_models, tmp_path_factory):
    from spectrt.export.exporter import ExportOptions, export_model

    return export_model(str(tiny_models["llama"]), tmp_path_factory.mktemp("serve") / "tiny",
                        ExportOptions(max_context=256), progress=lambda *_: None)


class Throttle:
    """Slows each decoding step of a model (so a test can act while a generation runs)."""

    def __init__(self, model):
        self.delay = 0.0
        step = model.session.decoder.step

        def slow_step(*args, **kwargs):
            if self.delay:
                time.sleep(self.delay)
            return step(*args, **kwargs)

        model.session.decoder.step = slow_step


class Server:
    def __init__(self, model, **kwargs):
        from spectrt.runtime.server import create_app

        self.app = create_app(model, **kwargs)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    @property
    def recent(self) -> list[dict]:
        return list(self.app.state.worker.recent)


@pytest.fixture(scope="module")
def model(tiny_export):
    import spectrt

    with spectrt.load(tiny_export, name="tiny") as m:
        m.throttle = Throttle(m)
        yield m


@pytest.fixture(scope="module")
def server(model):
    s = Server(model, api_key=KEY, max_body=MAX_BODY)
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def _chat(prompt):
    return [{"role": "user", "content": prompt}]


# ----------------------------------------------------------------------------- outputs

def test_chat_completion_is_model_generate(client, model):
    for prompt in PROMPTS[:3]:
        want = model.generate(_chat(prompt), 40)
        r = client.chat.completions.create(model="tiny", messages=_chat(prompt), max_tokens=40)
        assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
        choice = r.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == want.text
        assert choice.finish_reason == want.finish_reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, len(want.tokens))
        assert r.model_extra["spectrt"]["new_tokens"] == len(want.tokens)


def test_chat_completion_stream(client, model):
    for prompt in PROMPTS[:3]:
        want = model.generate(_chat(prompt), 40)
        chunks = list(client.chat.completions.create(model="tiny", messages=_chat(prompt), max_tokens=40,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want.text
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [want.finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.tokens)


def test_completions_raw_prompt(client, model):
    prompt = PROMPTS[1]
    want = model.generate(prompt, 30, chat=False)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=30)
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert r.usage.prompt_tokens == want.prompt_tokens and r.choices[0].finish_reason == want.finish_reason
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=30,
                                                                     stream=True)]
    assert "".join(pieces) == want.text
    ids = model.encode(prompt, chat=False)
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=30).choices[0].text == want.text
    assert client.completions.create(model="tiny", prompt=[prompt], max_tokens=30).choices[0].text == want.text


def test_stop_and_greedy_sampling_options(client, model):
    prompt = PROMPTS[0]
    full = model.generate(_chat(prompt), 60)
    stop = full.text[5:8]
    want = model.generate(_chat(prompt), 60, stop=stop)
    r = client.chat.completions.create(model="tiny", messages=_chat(prompt), max_tokens=60, stop=[stop],
                                       temperature=0, top_p=0.5, seed=3)
    assert r.choices[0].message.content == want.text == full.text[:full.text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_equals_the_api_and_unseeded_requests_get_a_seed(client, model):
    prompt = _chat(PROMPTS[1])
    want = model.generate(prompt, 30, temperature=1.0, top_k=50, seed=12)
    r = client.chat.completions.create(model="tiny", messages=prompt, max_tokens=30, temperature=1.0, top_p=1.0,
                                       seed=12, extra_body={"top_k": 50})
    assert r.choices[0].message.content == want.text
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=prompt, max_tokens=30, temperature=1.0, seed=12, extra_body={"top_k": 50}, stream=True)]
    assert "".join(pieces) == want.text
    r = client.chat.completions.create(model="tiny", messages=prompt, max_tokens=30, temperature=1.0)
    seed = r.model_extra["spectrt"]["seed"]
    assert model.generate(prompt, 30, temperature=1.0, seed=seed).text == r.choices[0].message.content


def test_max_tokens_capped_by_the_context(client, model):
    ids = [7] * 250  # 6 tokens of room in a 256-token context
    want = model.generate(ids, None, chat=False)
    assert want.stop_reason in ("eos", "context") and len(want.tokens) <= 6
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1000)
    assert r.usage.completion_tokens == len(want.tokens) and r.choices[0].finish_reason == want.finish_reason
    r = client.completions.create(model="tiny", prompt=ids)  # no max_tokens: up to the context
    assert r.usage.completion_tokens == len(want.tokens)


def test_models_and_health(client, server, model):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].owned_by == "spectrt"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    r = httpx.get(server.url + "/health")  # no key needed
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == "tiny"


# ----------------------------------------------------------------------------- errors

def _error(exc_info, status):
    e = exc_info.value
    assert e.status_code == status
    err = e.body if "message" in (e.body or {}) else (e.body or {}).get("error", {})
    assert isinstance(err["message"], str) and err["message"] and "type" in err and "code" in err
    return err


@pytest.mark.parametrize("kwargs, status, code, text", [
    (dict(max_tokens=0), 400, "integer_below_min_value", "'max_tokens' must be an integer >= 1"),
    (dict(max_tokens="lots"), 400, "invalid_type", "'max_tokens' must be an integer"),
    (dict(temperature=-0.7), 400, None, "temperature must be a finite number >= 0"),
    (dict(temperature=1.0, top_p=0), 400, None, "top_p must be in (0, 1]"),
    (dict(n=2), 400, "unsupported_value", "'n' must be 1"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_parameter", "'tools'"),
    (dict(model="gpt-4o"), 404, "model_not_found", "`gpt-4o` does not exist"),
    (dict(messages=[{"role": "user"}]), 400, None, "messages[0].content is missing"),
    (dict(messages="hi"), 400, None, "messages must be a non-empty list"),
    (dict(messages=_chat("x " * 400)), 400, "context_length_exceeded", "this model's context is 256 tokens"),
])
def test_bad_chat_requests(client, kwargs, status, code, text):
    args = {"model": "tiny", "messages": _chat("hi"), **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**args)
    err = _error(e, status)
    assert err["code"] == code and text in err["message"]


def test_bad_raw_requests(server):
    h = {"Authorization": f"Bearer {KEY}"}
    post = lambda path, **kw: httpx.post(server.url + path, headers=h, **kw)  # noqa: E731
    cases = [(post("/v1/chat/completions", json={"model": "tiny"}), 400, "'messages' is a required property"),
             (post("/v1/completions", json={"model": "tiny"}), 400, "'prompt' is a required property"),
             (post("/v1/chat/completions", content=b"{not json"), 400, "not valid JSON"),
             (post("/v1/chat/completions", json=[1, 2]), 400, "must be a JSON object"),
             (post("/v1/completions", json={"prompt": ["a", "b"]}), 400, "one prompt per request"),
             (post("/v1/completions", json={"prompt": "a", "echo": True}), 400, "'echo' is not supported"),
             (httpx.get(server.url + "/v1/chat/completions", headers=h), 405, "Method Not Allowed"),
             (httpx.get(server.url + "/v1/nothing", headers=h), 404, "Not Found")]
    for r, status, text in cases:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert text in err["message"] and err["type"] == "invalid_request_error", err
    # the model name may be left out (one model is served)
    r = post("/v1/completions", json={"prompt": "a", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["model"] == "tiny"


def test_body_size_limit(server):
    h = {"Authorization": f"Bearer {KEY}"}
    big = json.dumps({"model": "tiny", "prompt": "x" * MAX_BODY}).encode()
    r = httpx.post(server.url + "/v1/completions", headers=h, content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted while it arrives
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    r = httpx.post(server.url + "/v1/completions", headers=h, content=chunked())
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_api_key(server):
    for key, headers in (("wrong", None), (KEY, {"Authorization": openai.Omit()})):  # a wrong key, no key
        with openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError) as e:
                c.chat.completions.create(model="tiny", messages=_chat("hi"), max_tokens=3, extra_headers=headers)
            err = _error(e, 401)
            assert err["code"] == "invalid_api_key"
            assert err["message"].startswith("incorrect API key" if headers is None else "missing API key")
            with pytest.raises(openai.AuthenticationError):
                c.models.list(extra_headers=headers)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "a"})
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    assert r.headers["www-authenticate"] == "Bearer"


def test_no_api_key_configured(model):
    s = Server(model)
    try:
        with openai.OpenAI(base_url=s.url + "/v1", api_key="anything", max_retries=0) as c:
            assert c.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(s.url + "/v1/models").status_code == 200
    finally:
        s.stop()


# ----------------------------------------------------------------------------- queueing and disconnects

def test_eight_concurrent_clients(server, model):
    want = {p: model.generate(_chat(p), 30).text for p in PROMPTS}
    before = len(server.recent)

    def ask(i):
        prompt = PROMPTS[i]
        with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            if i % 2:
                r = c.chat.completions.create(model="tiny", messages=_chat(prompt), max_tokens=30)
                return prompt, r.choices[0].message.content
            chunks = c.chat.completions.create(model="tiny", messages=_chat(prompt), max_tokens=30, stream=True)
            return prompt, "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    model.throttle.delay = 0.005  # the requests overlap: they queue behind each other
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
    finally:
        model.throttle.delay = 0.0
    assert [p for p, _ in answers] == PROMPTS
    for prompt, text in answers:
        assert text == want[prompt], prompt
    assert len(server.recent) - before == 8


def _longest(model):
    return max(((p, model.generate(_chat(p), 150)) for p in PROMPTS), key=lambda pc: len(pc[1].tokens))


def test_client_disconnecting_mid_stream_stops_its_generation(client, server, model):
    prompt, full = _longest(model)
    assert len(full.tokens) >= 40, "a prompt with a long greedy output is needed"
    before = len(server.recent)
    model.throttle.delay = 0.02  # 40+ steps: at least 0.8 s if it ran to the end
    try:
        stream = client.chat.completions.create(model="tiny", messages=_chat(prompt), max_tokens=150, stream=True)
        got = ""
        for chunk in stream:
            got += chunk.choices[0].delta.content or ""
            if got:
                break
        stream.close()  # hang up
        deadline = time.time() + 10
        while len(server.recent) == before:
            assert time.time() < deadline, "the generation did not end"
            time.sleep(0.02)
    finally:
        model.throttle.delay = 0.0
    record = server.recent[-1]
    assert record["stop_reason"] == "cancelled"
    assert record["completion_tokens"] < len(full.tokens) // 2, record
    assert full.text.startswith(got)
    # the next request is served normally
    r = client.chat.completions.create(model="tiny", messages=_chat(prompt), max_tokens=150)
    assert r.choices[0].message.content == full.text


def test_client_disconnecting_while_queued_or_not_streaming(server, model):
    prompt, full = _longest(model)
    before = len(server.recent)
    body = {"model": "tiny", "messages": _chat(prompt), "max_tokens": 150}
    h = {"Authorization": f"Bearer {KEY}"}
    model.throttle.delay = 0.02
    try:
        with ThreadPoolExecutor(2) as pool:  # the first runs, the second waits; both clients give up
            for f in [pool.submit(httpx.post, server.url + "/v1/chat/completions", json=body, headers=h,
                                  timeout=0.3) for _ in range(2)]:
                with pytest.raises(httpx.TimeoutException):
                    f.result()
        deadline = time.time() + 10
        while len(server.recent) < before + 2:
            assert time.time() < deadline, "the generations did not end"
            time.sleep(0.02)
    finally:
        model.throttle.delay = 0.0
    records = server.recent[before:]
    assert [r["stop_reason"] for r in records] == ["cancelled", "cancelled"], records
    assert all(r["completion_tokens"] < len(full.tokens) // 2 for r in records), records


def test_full_queue_is_503(model):
    s = Server(model, max_queue=0)  # nothing may wait behind a running generation
    prompt, full = _longest(model)
    model.throttle.delay = 0.02
    try:
        with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0) as c:
            stream = c.chat.completions.create(model="tiny", messages=_chat(prompt), max_tokens=150, stream=True)
            next(iter(stream))  # it runs
            with pytest.raises(openai.InternalServerError) as e:
                c.chat.completions.create(model="tiny", messages=_chat("hi"), max_tokens=2)
            assert _error(e, 503)["code"] == "server_busy"
            stream.close()
    finally:
        model.throttle.delay = 0.0
        s.stop()


# ----------------------------------------------------------------------------- the command

def test_serve_command(tiny_export, tmp_path):
    env = {**os.environ, "SPECTRT_API_KEY": "cli-key", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "spectrt", "serve", str(tiny_export), "--port", "0",
                             "--model-name", "m", "--max-tokens", "5", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for _ in range(50):  # the banner (anything the runtime logs first is skipped)
            lines.append(proc.stderr.readline())
            m = re.search(r"^spectrt serve: m \(.*\) on (http://127\.0\.0\.1:(\d+)/v1)$", lines[-1].strip())
            if m or not lines[-1]:
                break
        assert m, lines
        with openai.OpenAI(base_url=m.group(1), api_key="cli-key", max_retries=0) as c:
            deadline = time.time() + 30
            while True:
                try:
                    r = c.completions.create(model="m", prompt="The quick brown fox", max_tokens=100)
                    break
                except openai.APIConnectionError:
                    assert time.time() < deadline
                    time.sleep(0.1)
            assert r.usage.completion_tokens <= 5  # --max-tokens caps the request's 100
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
        proc.stderr.close()


def test_serve_command_port_in_use(tiny_export, capsys):
    from spectrt.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(tiny_export), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spectrt serve: error: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1
