"""CLI subcommands, one module each: ``command`` is its click command (spectrt.cli lists them)."""
