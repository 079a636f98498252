"""spectrt: export and edge deployment of speculative decoding."""
from pathlib import Path

from spectrt.version import __version__

# pyproject's package-dir installs the top-level folders (export/, runtime/, calibration/, profiles/) as
# spectrt.export, spectrt.runtime, ... . When Python runs from a source checkout's root (`python -m
# spectrt`, `python -m pytest`), ./spectrt shadows the installed package; letting the subpackages also
# resolve beside this folder keeps such runs identical to the installed layout.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "runtime" / "contract.py").is_file():
    __path__.append(str(_checkout))

__all__ = ["__version__", "load"]


def __getattr__(name):
    # `spectrt.load` imports the runtime (onnxruntime, tokenizers) on first use only: `import spectrt` stays light
    if name == "load":
        from spectrt.runtime.api import load

        return load
    raise AttributeError(f"module 'spectrt' has no attribute {name!r}")
