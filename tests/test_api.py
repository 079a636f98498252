"""The Python API (`spectrt.load` -> Model: generate, stream, messages, stop strings, cancellation) and
`spectrt chat`, on a tiny random export."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from click.testing import CliRunner

from spectrt.runtime.api import load
from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.session import SessionConfig, SpecSession

PROMPTS = ["Tell me a story", "The quick brown fox", "abc", "Hello there, how are you?"]


@pytest.fixture(scope="module")
def tiny_export(tiny_models, tmp_path_factory):
    from spectrt.export.exporter import ExportOptions, export_model

    return export_model(str(tiny_models["llama"]), tmp_path_factory.mktemp("api") / "tiny",
                        ExportOptions(max_context=256), progress=lambda *_: None)


@pytest.fixture(scope="module")
def model(tiny_export):
    import spectrt

    with spectrt.load(tiny_export) as m:
        yield m


def _session_tokens(export, ids, n, **config):
    with SpecSession(export, SessionConfig(**config)) as s:
        return s.generate(ids, n).tokens


def test_import_spectrt_stays_light_and_load_is_lazy():
    code = ("import sys, spectrt\n"
            "assert 'spectrt.runtime.api' not in sys.modules and 'onnxruntime' not in sys.modules\n"
            "assert callable(spectrt.load) and 'spectrt.runtime.api' in sys.modules\n"
            "import spectrt.runtime.api\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'starlette', 'uvicorn'})\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generate_is_the_session_greedy_output(model, tiny_export):
    ids = model.encode(PROMPTS[0])
    assert ids == model.codec.encode(PROMPTS[0], chat=True)
    c = model.generate(PROMPTS[0], max_new_tokens=40)
    assert c.tokens == _session_tokens(tiny_export, ids, 40, mode="ar")
    assert c.text == model.decode(c.tokens) and c.prompt_tokens == len(ids)
    assert c.usage == {"prompt_tokens": len(ids), "completion_tokens": len(c.tokens),
                       "total_tokens": len(ids) + len(c.tokens)}
    assert c.finish_reason == {"eos": "stop", "max_tokens": "length"}[c.stop_reason]
    assert c.stats["new_tokens"] == len(c.tokens)
    raw = model.generate(PROMPTS[0], max_new_tokens=20, chat=False)
    assert raw.prompt_tokens == len(model.codec.encode(PROMPTS[0], chat=False)) < len(ids)
    assert model.generate(ids, max_new_tokens=40).tokens == c.tokens  # token ids are used as they are


def test_messages_use_the_chat_template(model):
    from spectrt.runtime.text import render_chat

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    text = render_chat(model.codec.chat_template, messages, model.codec.special)
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    ids = model.encode(messages)
    assert ids == model.codec.tokenizer.encode(text, add_special_tokens=False).ids
    assert model.encode([{"role": "user", "content": "hi"}]) == model.encode("hi")
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    assert model.encode(parts) == model.encode("hi")
    assert model.generate(messages, 10).tokens == model.generate(ids, 10).tokens


@pytest.mark.parametrize("prompt, message", [
    ([], "messages must be a non-empty list"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content is missing"),
    ([{"role": "user", "content": 5}], "messages[0].content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text parts"),
    ([100000], "out of the vocabulary"),
])
def test_bad_prompts(model, prompt, message):
    with pytest.raises(SpectrtError, match=message.replace("[", r"\[").replace("]", r"\]")):
        model.generate(prompt)


def test_bad_options(model):
    with pytest.raises(SpectrtError, match="temperature must be a finite number >= 0"):
        model.generate("hi", temperature=-0.8)
    with pytest.raises(SpectrtError, match="top_p must be in"):
        model.stream("hi", temperature=0.8, top_p=2)
    with pytest.raises(SpectrtError, match="seed must be an integer"):
        model.generate("hi", temperature=0.8, seed="x")
    greedy = model.generate("hi", 6).tokens
    assert model.generate("hi", 6, temperature=0, top_p=0.9, top_k=40, seed=1).tokens == greedy  # greedy: no effect
    with pytest.raises(SpectrtError, match="max_new_tokens must be an integer >= 1"):
        model.generate("hi", 0)
    with pytest.raises(SpectrtError, match="unknown generation option"):
        model.generate("hi", typical_p=0.5)
    with pytest.raises(SpectrtError, match="stop must be"):
        model.generate("hi", stop=["a", "b", "c", "d", "e"])
    with pytest.raises(SpectrtError, match="the prompt has 300 tokens; this model's context is 256"):
        model.generate([5] * 300)
    import spectrt

    with pytest.raises(SpectrtError, match="unknown option"):
        spectrt.load("nowhere", beam_width=4)


def test_max_new_tokens_none_runs_to_the_context_limit(model):
    ids = [5] * 250
    c = model.generate(ids, max_new_tokens=None)
    assert len(c.tokens) <= 6 and (c.stop_reason == "eos" or (c.stop_reason, len(c.tokens)) == ("context", 6))
    assert c.finish_reason in ("stop", "length")


def test_stream_joins_to_the_completion(model):
    for prompt in PROMPTS:
        want = model.generate(prompt, 60)
        s = model.stream(prompt, 60)
        pieces = list(s)
        assert "".join(pieces) == want.text and s.completion.tokens == want.tokens
        assert all(pieces)
    with model.stream(PROMPTS[1], 60) as s:
        assert s.text == model.generate(PROMPTS[1], 60).text


@pytest.mark.parametrize("config", [dict(mode="ar"), dict(mode="spec", draft="lookup")], ids=["ar", "lookup"])
def test_stop_strings(tiny_export, config):
    import spectrt

    with spectrt.load(tiny_export, **config) as m:
        for prompt in PROMPTS:
            full = m.generate(prompt, 80)
            if len(full.text) < 12:
                continue
            stop = full.text[8:11]
            first = full.text.find(stop)
            c = m.generate(prompt, 80, stop=[stop, "\u2603never"])
            assert c.stop_reason == "stop" and c.finish_reason == "stop"
            assert c.text == full.text[:first]
            # the fewest tokens whose text holds the stop string
            k = len(c.tokens)
            assert c.tokens == full.tokens[:k] and stop in m.decode(full.tokens[:k])
            assert stop not in m.decode(full.tokens[:k - 1])[first:]
            s = m.stream(prompt, 80, stop=stop)
            assert "".join(s) == c.text and s.completion.tokens == c.tokens


def test_lookup_drafts_give_the_same_tokens(tiny_export, model):
    import spectrt

    with spectrt.load(tiny_export, mode="spec", draft="lookup") as spec:
        assert spec.mode == "spec"
        for prompt in PROMPTS:
            assert spec.generate(prompt, 60).tokens == model.generate(prompt, 60).tokens


def test_should_stop_and_closing_a_stream_cancel(model):
    prompt, full = max(((p, model.generate(p, 120)) for p in PROMPTS), key=lambda pc: len(pc[1].tokens))
    assert len(full.tokens) > 10
    calls = []

    def stop_after_three():
        calls.append(1)
        return len(calls) > 3

    c = model.generate(prompt, 120, should_stop=stop_after_three)
    assert c.stop_reason == "cancelled" and c.finish_reason == "cancelled"
    assert c.tokens == full.tokens[:2] and c.text == model.decode(c.tokens)  # polled before prefill, then per step
    s = model.stream(prompt, 120)
    first = next(s)
    s.close()
    assert first and s.completion.stop_reason == "cancelled" and len(s.completion.tokens) < len(full.tokens)
    assert list(s) == []
    assert model.generate(prompt, 120).tokens == full.tokens  # the model is fine afterwards


def test_concurrent_calls_queue_and_do_not_mix(model):
    want = {p: model.generate(p, 50).tokens for p in PROMPTS}
    got: dict[int, list] = {}

    def run(i):
        p = PROMPTS[i % len(PROMPTS)]
        got[i] = (p, model.generate(p, 50).tokens if i % 2 else model.stream(p, 50).text)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (p, out) in got.items():
        assert out == (want[p] if i % 2 else model.decode(want[p]))
    assert len(got) == 8


def test_closed_model_refuses(tiny_export):
    import spectrt

    m = spectrt.load(tiny_export, name="x")
    assert m.name == "x"
    m.close()
    m.close()
    with pytest.raises(SpectrtError, match="closed"):
        m.generate("hi")


def test_chat_command(tiny_export, model):
    from spectrt.cli import cli

    n = 12
    system = [{"role": "system", "content": "be brief"}]
    turn1 = model.generate(system + [{"role": "user", "content": "hello"}], n).text
    turn2 = model.generate(system + [{"role": "user", "content": "hello"}, {"role": "assistant", "content": turn1},
                                     {"role": "user", "content": "again"}], n).text
    fresh = model.generate(system + [{"role": "user", "content": "again"}], n).text
    result = CliRunner().invoke(cli, ["chat", str(tiny_export), "--system", "be brief", "-n", str(n), "--mode", "ar"],
                                input="hello\nagain\n/reset\nagain\n/exit\nnever\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{turn1}\n{turn2}\n{fresh}\n"
    assert "[conversation reset]" in result.stderr


def test_sampling_and_kv_reuse_through_the_api(model):
    """Seeded sampling is reproducible and streams the same text; a conversation's next turn reuses the cache and
    gives what a fresh model gives."""
    a = model.generate("tell me a story", 24, temperature=1.0, seed=4)
    b = model.generate("tell me a story", 24, temperature=1.0, seed=4)
    assert a.tokens == b.tokens and a.tokens != model.generate("tell me a story", 24).tokens
    assert "".join(model.stream("tell me a story", 24, temperature=1.0, seed=4)) == a.text
    chat = [{"role": "user", "content": "hello"}]
    first = model.generate(chat, 12)
    chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "more"}]
    second = model.generate(chat, 12)
    assert second.stats["reused_tokens"] > 0
    with load(model.session.artifact.root) as fresh:
        fresh.reuse = False
        assert fresh.generate(chat, 12).tokens == second.tokens
