"""Options that load an export for generation (`serve`, `chat`), and loading it through the Python API."""
from __future__ import annotations

from spectrt.commands._common import (backend_options, decoding_options, profile_name, sampling_config,
                                      sampling_options)
from spectrt.runtime.api import Model, load


def model_options(f):
    """The decoding, backend and sampling options of `spectrt generate`, for commands that load a model."""
    return decoding_options(backend_options()(sampling_options(f)))


def load_model(artifact, name=None, *, profile=None, temperature, top_k, top_p, seed, typical, **options) -> Model:
    """``spectrt.load`` with the values of :func:`model_options` (a profile YAML path -> its name; the sampling
    options become the model's default sampling)."""
    return load(artifact, name=name, profile=profile_name(profile),
                sampling=sampling_config(temperature, top_k, top_p, seed, typical), **options)
