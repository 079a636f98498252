"""Conversations: a session keeps its KV cache and a new turn prefills only the tokens after the longest
common prefix with what is cached, for every drafter, with output identical to a fresh prefill."""
from __future__ import annotations

import pytest

from spectrt.runtime.artifact import load_artifact
from spectrt.runtime.generate import Decoder
from spectrt.runtime.ort_runner import OrtBaseRunner
from spectrt.runtime.sampling import SamplingConfig
from spectrt.runtime.session import SessionConfig, SpecSession


TURN1 = list(range(30, 50))


@pytest.mark.parametrize("kind, mode, draft", [("medusa", "ar", None), ("medusa", "spec", "heads"),
                                               ("medusa", "spec", "heads+lookup"), ("hydra++", "spec", "heads"),
                                               ("medusa", "spec", "lookup")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_second_turn_prefills_only_new_tokens_and_equals_a_fresh_prefill(draft_exports, kind, mode, draft, temperature):
    cfg = SessionConfig(mode=mode, draft=draft, sampling=SamplingConfig(temperature=temperature, seed=5))
    with SpecSession(draft_exports[kind], cfg) as s:
        first = s.generate(TURN1, 20, reuse=True)
        turn2 = TURN1 + first.tokens + [7, 8, 9, 10, 11]  # the conversation so far + the user's next message
        second = s.generate(turn2, 20, reuse=True)
        assert first.reused_tokens == 0
        # everything committed to the cache is reused: the prompt and the output except its last token (the
        # bonus of the last step, never fed back), so the new turn prefills its 5 tokens + that one
        assert second.reused_tokens == len(TURN1) + len(first.tokens) - 1
        edited = TURN1[:10] + [3, 4]  # an edited history: only the common prefix stays
        third = s.generate(edited, 20, reuse=True)
        assert third.reused_tokens == 10
    with SpecSession(draft_exports[kind], cfg) as fresh:
        assert fresh.generate(turn2, 20).tokens == second.tokens
        assert fresh.generate(edited, 20).tokens == third.tokens


def test_reuse_needs_an_unchanged_cache(draft_exports):
    """Another writer to the base runner (or a failed call) makes the decoder start over instead of reusing."""
    art = load_artifact(draft_exports["medusa"])
    with OrtBaseRunner(art, max_q=16) as base:
        a, b = Decoder(base, prefill_chunk=16), Decoder(base, prefill_chunk=16)
        first = a.generate(TURN1, 10, reuse=True)
        b.generate([5, 6, 7], 10)  # overwrites the shared cache
        again = a.generate(TURN1 + first.tokens, 10, reuse=True)
        assert again.reused_tokens == 0

        def stop(tokens):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            a.generate(TURN1, 10, on_tokens=stop, reuse=True)  # the callback stops it: the cache stays consistent
        assert a.generate(TURN1 + [1], 10, reuse=True).reused_tokens == len(TURN1)


def test_a_prompt_equal_to_the_cache_still_runs_its_last_token(draft_exports):
    with SpecSession(draft_exports["medusa"], SessionConfig(mode="ar")) as s:
        one = s.generate(TURN1, 8, reuse=True)
        two = s.generate(TURN1, 8, reuse=True)
        assert two.reused_tokens == len(TURN1) - 1 and two.tokens == one.tokens
