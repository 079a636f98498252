"""spectrt: export and edge deployment of speculative decoding."""
from spectrt.version import __version__

__all__ = ["__version__"]
