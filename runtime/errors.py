"""Errors spectrt reports to users as one line (the CLI prints them without a traceback)."""


class SpectrtError(Exception):
    """A user-facing error: bad input, a corrupt artifact, an unsupported model."""


class ArtifactError(SpectrtError):
    """An exported artifact directory is missing, corrupt or from another contract version."""
