"""The Python API: ``spectrt.load(DIR)`` -> :class:`Model` with ``generate`` and ``stream``.

    import spectrt

    with spectrt.load("out/smollm2") as model:
        print(model.generate("Name three rivers.", max_new_tokens=64).text)
        for piece in model.stream([{"role": "user", "content": "And three lakes?"}]):
            print(piece, end="", flush=True)

A :class:`Model` owns one :class:`~spectrt.runtime.session.SpecSession` (one KV cache) and runs one
generation at a time: calls from several threads queue on a lock (batch 1). Decoding is greedy by default
(the output is token for token what the base model alone produces), or seeded sampling with
``temperature``/``top_p``/``top_k``/``seed`` (speculative output is token for token AR sampling's output for
the same seed: runtime.sampling). The KV cache is kept between calls: a call prefills only the tokens after
the longest prefix its prompt shares with the previous call's prompt + output (a chat's next turn).

Only the runtime's own modules are imported here: no torch, no transformers, no server libraries.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

from spectrt.runtime.errors import SpectrtError
from spectrt.runtime.sampling import SamplingConfig
from spectrt.runtime.session import DEFAULT_MAX_NEW_TOKENS, SessionConfig, SpecSession
from spectrt.runtime.text import render_chat

Message = dict  # {"role": "system" | "user" | "assistant" | ..., "content": str}
Prompt = Union[str, Sequence[Message], Sequence[int]]

FINISH_REASONS = {"eos": "stop", "stop": "stop", "max_tokens": "length", "context": "length",
                  "cancelled": "cancelled"}
MAX_STOP_STRINGS = 4  # as OpenAI's API


class ContextLengthError(SpectrtError):
    """The prompt leaves no room for a single new token in the model's context."""


class SamplingError(SpectrtError):
    """A sampling parameter of the wrong type or out of range."""


class _Stopped(Exception):
    """Raised from the token callback to end a generation early (stop string or cancellation)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Completion:
    """One generation: the text (stop string excluded), the new token ids, and why it ended.

    ``finish_reason`` is OpenAI's: "stop" (end-of-sequence token or a stop string), "length" (max new
    tokens or the context limit) or "cancelled" (``should_stop`` / a closed stream). ``stop_reason`` is the
    runtime's finer one: "eos", "stop", "max_tokens", "context" or "cancelled".
    """

    text: str
    tokens: list[int]
    prompt_tokens: int
    stop_reason: str
    stats: dict = field(default_factory=dict)

    @property
    def finish_reason(self) -> str:
        return FINISH_REASONS[self.stop_reason]

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
                "total_tokens": self.prompt_tokens + len(self.tokens)}


def sampling_config(default: SamplingConfig, temperature=None, top_p=None, top_k=None, seed=None,
                    **unknown) -> SamplingConfig:
    """The sampling of one call: ``default`` (the model's) with the given fields replaced; SamplingError on a
    wrong type or range. temperature 0: greedy (top_p, top_k and seed then change nothing)."""
    if unknown:
        raise SpectrtError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    number = lambda v: not isinstance(v, bool) and isinstance(v, (int, float))  # noqa: E731
    integer = lambda v: not isinstance(v, bool) and isinstance(v, int)  # noqa: E731
    for name, value, ok, what in (("temperature", temperature, number, "a number >= 0"),
                                  ("top_p", top_p, number, "a number in (0, 1]"),
                                  ("top_k", top_k, integer, "an integer >= 0"), ("seed", seed, integer, "an integer")):
        if value is not None and not ok(value):
            raise SamplingError(f"{name} must be {what}, not {value!r}")
    given = {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed))
             if v is not None}
    try:
        return dataclasses.replace(default, **given)
    except SpectrtError as e:
        raise SamplingError(str(e).replace("top-p", "top_p").replace("top-k", "top_k")) from None


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise SpectrtError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them")
    return stops


def _message_text(i: int, content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI's content parts: text only
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise SpectrtError(f"messages[{i}].content: only text parts are supported, not {kind!r}")
            parts.append(part["text"])
        return "".join(parts)
    raise SpectrtError(f"messages[{i}].content must be a string, not {type(content).__name__}")


def normalize_messages(messages) -> list[dict]:
    """``[{"role": str, "content": str | text parts}, ...]`` -> plain role/content dicts (checked)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise SpectrtError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise SpectrtError(f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise SpectrtError(f"messages[{i}].role must be a non-empty string")
        if "content" not in m or m["content"] is None:
            raise SpectrtError(f"messages[{i}].content is missing")
        out.append({"role": role, "content": _message_text(i, m["content"])})
    return out


class _TextTracker:
    """Token ids -> text pieces for a stream: holds back incomplete UTF-8 and any tail that may begin a
    stop string; ends the generation (``_Stopped``) at a stop string or when ``should_stop()`` is true."""

    def __init__(self, decode, stops: list[str], on_text, should_stop):
        self.decode, self.stops, self.on_text, self.should_stop = decode, stops, on_text, should_stop
        self.ids: list[int] = []
        self.text = ""  # decoded text of self.ids (cut at a stop string once one is found)
        self.sent = 0  # characters of self.text handed to on_text
        self.hit = False

    def __call__(self, new_ids) -> None:
        if self.should_stop is not None and self.should_stop():
            raise _Stopped("cancelled")
        start = len(self.ids)
        self.ids.extend(int(t) for t in new_ids)
        text = self.decode(self.ids)
        if self.stops and self._find(text, self.sent) is not None:
            # the fewest new tokens whose text holds a stop string (a step may accept several tokens)
            for k in range(start + 1, len(self.ids) + 1):
                text = self.decode(self.ids[:k])
                cut = self._find(text, self.sent)
                if cut is not None:
                    del self.ids[k:]
                    self.text, self.hit = text[:cut], True
                    self._send(len(self.text))
                    raise _Stopped("stop")
        self.text = text
        end = len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            end = len(text.rstrip("\ufffd"))
        end -= self._stop_prefix(text[:end])
        self._send(end)

    def _find(self, text: str, start: int):
        """Index of the earliest stop string in text (searching from a little before ``start``), or None."""
        hits = [i for s in self.stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
        return min(hits) if hits else None

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _send(self, end: int) -> None:
        if end > self.sent:
            piece = self.text[self.sent:end]
            self.sent = end
            if self.on_text is not None:
                self.on_text(piece)

    def finish(self) -> None:
        """The generation ended: send whatever was held back (the completion's full text)."""
        if not self.hit:
            self.text = self.decode(self.ids)
        self._send(len(self.text))


class Model:
    """An exported model, ready to generate (see the module docstring). Use :func:`load` to make one."""

    def __init__(self, artifact_dir, config: SessionConfig | None = None, name: str | None = None):
        self.session = SpecSession(artifact_dir, config or SessionConfig())
        self.session.__enter__()
        self.name = name or Path(os.path.abspath(artifact_dir)).name
        self.codec = self.session.codec
        self.vocab = self.session.artifact.manifest.model.vocab
        self.sampling = self.session.config.sampling  # the default of every call
        self.reuse = True  # keep the KV cache between calls (conversations prefill only their new tokens)
        self._lock = threading.Lock()
        self._closed = False
        self.generations = 0  # finished generate() calls (any finish reason)
        self.generated_tokens = 0  # new tokens over all calls

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.session.__exit__(None, None, None)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    @property
    def max_context(self) -> int:
        """Prompt + output tokens the KV cache holds."""
        return self.session.max_context

    @property
    def mode(self) -> str:
        return self.session.mode

    @property
    def has_chat_template(self) -> bool:
        return self.codec.chat_template is not None

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt, chat: bool = True) -> list[int]:
        """Token ids of a prompt: a string (in the chat template as a user message unless ``chat=False``),
        a list of {role, content} messages (always in the chat template), or token ids (used as they are)."""
        if isinstance(prompt, str):
            return self.codec.encode(prompt, chat=chat)
        if isinstance(prompt, (list, tuple)) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab]
            if bad:
                raise SpectrtError(f"token id {bad[0]} is out of the vocabulary [0, {self.vocab})")
            return list(prompt)
        messages = normalize_messages(prompt)
        if self.codec.chat_template is None:
            raise SpectrtError("this model has no chat template; give a plain prompt with chat=False")
        text = render_chat(self.codec.chat_template, messages, self.codec.special)
        return self.codec.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.codec.decode(ids)

    def check_prompt(self, ids: Sequence[int]) -> None:
        """ContextLengthError unless the prompt leaves room for at least one new token."""
        if not ids:
            raise SpectrtError("empty prompt")
        if len(ids) >= self.max_context:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens; this model's context is {self.max_context} "
                                     "tokens (prompt + output)")

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: Prompt, max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS, stop=None, *,
                 chat: bool = True, on_text: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, **sampling) -> Completion:
        """Greedy generation of at most ``max_new_tokens`` (None: up to the context limit) new tokens.

        ``stop``: a string or up to 4 strings; generation ends at the first one (not included in the text).
        ``on_text(piece)`` receives the text as it is decoded (the pieces join to ``Completion.text``);
        ``should_stop()`` is polled after every decoding step and ends the generation ("cancelled") when true.
        ``temperature``/``top_p``/``top_k``/``seed``: seeded sampling (default: the model's, greedy unless
        loaded with ``sampling=``). Thread-safe: concurrent calls run one at a time.
        """
        cfg = sampling_config(self.sampling, **sampling)
        stops = _stop_list(stop)
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens < 1):
            raise SpectrtError(f"max_new_tokens must be an integer >= 1, not {max_new_tokens!r}")
        ids = self.encode(prompt, chat=chat)
        with self._lock:
            if self._closed:
                raise SpectrtError("the model is closed")
            self.check_prompt(ids)
            n = self.max_context if max_new_tokens is None else max_new_tokens  # the context limit stops it first
            tracker = _TextTracker(self.codec.decode, stops, on_text, should_stop)
            if should_stop is not None and should_stop():  # cancelled while it waited for the lock
                return self._done(Completion("", [], len(ids), "cancelled"))
            try:
                self.session.decoder.sampling = cfg
                res = self.session.decoder.generate(ids, n, tracker, reuse=self.reuse)
            except _Stopped as e:
                stats = {"prompt_tokens": len(ids), "new_tokens": len(tracker.ids), "stop_reason": e.reason}
                return self._done(Completion(tracker.text, tracker.ids, len(ids), e.reason, stats))
            tracker.finish()
            return self._done(Completion(tracker.text, list(res.tokens), len(ids), res.stop_reason, res.stats()))

    def _done(self, c: Completion) -> Completion:
        self.generations += 1
        self.generated_tokens += len(c.tokens)
        return c

    def stream(self, prompt: Prompt, max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS, stop=None, *,
               chat: bool = True, **sampling) -> "TextStream":
        """Like :meth:`generate`, as an iterator of text pieces. The arguments are checked now; decoding
        starts at the first ``next()``. ``.completion`` holds the result once the iterator is exhausted;
        ``close()`` (or leaving a ``with`` block, or dropping the iterator) stops the generation."""
        sampling_config(self.sampling, **sampling)
        _stop_list(stop)
        ids = self.encode(prompt, chat=chat)
        self.check_prompt(ids)
        return TextStream(self, ids, max_new_tokens, stop, sampling)


class TextStream:
    """Iterator of text pieces of one generation, decoded on a worker thread (see :meth:`Model.stream`)."""

    _END = object()

    def __init__(self, model: Model, ids: list[int], max_new_tokens, stop, sampling: dict):
        self._model, self._ids, self._n, self._stop, self._sampling = model, ids, max_new_tokens, stop, sampling
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False
        self.completion: Completion | None = None

    def _run(self) -> None:
        try:
            self.completion = self._model.generate(self._ids, self._n, self._stop, on_text=self._queue.put,
                                                   should_stop=self._cancel.is_set, **self._sampling)
            self._queue.put(self._END)
        except BaseException as e:  # re-raised in the consumer's thread
            self._queue.put(e)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._finished:
            raise StopIteration
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spectrt-stream", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, str):
            return item
        self._finished = True
        self._thread.join()
        if isinstance(item, BaseException):
            raise item
        raise StopIteration

    @property
    def text(self) -> str:
        """The whole text (consumes the rest of the stream)."""
        for _ in self:
            pass
        return self.completion.text if self.completion else ""

    def close(self) -> None:
        """Stop the generation (after its current step) and wait for it."""
        self._cancel.set()
        if self._thread is not None:
            self._thread.join()
        self._finished = True

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __del__(self):
        self._cancel.set()


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SessionConfig))


def load(artifact_dir, *, name: str | None = None, **config) -> Model:
    """Load an export (the output of `spectrt export`) for generation.

    ``config``: the :class:`~spectrt.runtime.session.SessionConfig` fields, e.g. ``backend="trt"``,
    ``profile="orin-nano"``, ``provider``, ``threads``, ``max_context``, ``mode="ar"``, ``draft``, ``tree`` (or ``tree="dynamic"`` with ``tree_nodes``),
    ``verify=True``. ``name``: the model id the server reports (default: the directory's name).
    """
    unknown = sorted(set(config) - set(CONFIG_FIELDS))
    if unknown:
        raise SpectrtError(f"load(): unknown option(s) {', '.join(unknown)} (choose from {', '.join(CONFIG_FIELDS)})")
    return Model(artifact_dir, SessionConfig(**config), name=name)
