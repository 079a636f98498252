"""Tokenization and chat templates without transformers: ``tokenizers`` + jinja2, like HF renders them."""
from __future__ import annotations

import json
from datetime import datetime

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from spectrt.runtime.errors import ArtifactError, SpectrtError
from spectrt.runtime.artifact import Artifact


def _raise(message):
    raise SpectrtError(f"chat template: {message}")


def render_chat(template: str, messages: list[dict], special: dict, add_generation_prompt: bool = True) -> str:
    """Render a Hugging Face chat template the way transformers does (sandboxed, trim/lstrip blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                   ensure_ascii=ensure_ascii)
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special)
    except TemplateError as e:
        raise SpectrtError(f"chat template: {e}") from None


class TextCodec:
    """Prompt -> token ids (chat template or raw) and ids -> text, from an artifact's tokenizer files."""

    def __init__(self, artifact: Artifact):
        info = artifact.manifest.tokenizer
        path = artifact.path(info.file)
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception
            raise ArtifactError(f"{path}: cannot load tokenizer ({e})") from None
        self.special = info.special_tokens()
        self.eos_ids = info.eos_token_ids
        self.chat_template = None
        if info.chat_template:
            try:
                self.chat_template = artifact.path(info.chat_template).read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise ArtifactError(f"{artifact.path(info.chat_template)}: cannot read the chat template ({e})") from None

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        if chat:
            if self.chat_template is None:
                raise SpectrtError("this model has no chat template; use --no-chat for a raw prompt")
            text = render_chat(self.chat_template, [{"role": "user", "content": prompt}], self.special)
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class StreamPrinter:
    """Prints text as tokens arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, codec: TextCodec, write):
        self.codec, self.write, self.ids, self.printed = codec, write, [], 0

    def __call__(self, new_ids) -> None:
        self.ids.extend(new_ids)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.printed:])
        self.printed = len(text)
