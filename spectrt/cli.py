"""The `spectrt` command line (click): a thin layer over the public Python API.

Each subcommand is the click command ``command`` of ``spectrt/commands/<name>.py``. A module is imported
only when its command runs (or the group's help lists it), and no module imports torch, transformers or
onnx at load time: `spectrt generate` on a Jetson loads the runtime only.

Exit status: 0 ok; 1 the command's own failure verdict (bench mismatches, check findings); 2 bad input,
as one line on stderr (click usage errors and SpectrtError); 130 interrupted.
"""
from __future__ import annotations

import importlib
import sys

import click

from spectrt.commands._common import SpectrtGroup, one_line
from spectrt.version import __version__

# name -> module, in the order of the workflow (export on a workstation, run on the device)
COMMANDS = {
    "export": "spectrt.commands.export",
    "generate": "spectrt.commands.generate",
    "chat": "spectrt.commands.chat",
    "serve": "spectrt.commands.serve",
    "bench": "spectrt.commands.bench",
    "distill": "spectrt.commands.distill",
    "calibrate": "spectrt.commands.calibrate",
    "check": "spectrt.commands.check",
    "build": "spectrt.commands.build",
    "profile": "spectrt.commands.profile",
    "selftest": "spectrt.commands.selftest",
    "quality": "spectrt.commands.quality",
    "devices": "spectrt.commands.devices",
}
RENAMED = {"profiles": "devices"}  # old name -> new; no aliases (`profiles` was one letter from `profile`)


def _error_line(e: click.UsageError) -> str:
    where = e.ctx.command_path if e.ctx is not None else "spectrt"
    return f"{where}: error: {one_line(e.format_message())}"


class LazyGroup(SpectrtGroup):
    """Loads subcommands lazily, and maps every failure to an exit status (see the module docstring).

    ``main(..., standalone_mode=False)`` returns that status instead of the command's return value, so
    `spectrt.cli.main(argv)` is an int for tests and the console script; standalone mode exits with it.
    """

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx):
        return list(self.lazy_commands) + [n for n in super().list_commands(ctx) if n not in self.lazy_commands]

    def get_command(self, ctx, name):
        if name in self.lazy_commands:
            return importlib.import_module(self.lazy_commands[name]).command
        return super().get_command(ctx, name)

    def resolve_command(self, ctx, args):
        if args and args[0] in RENAMED and self.get_command(ctx, args[0]) is None:
            raise click.UsageError(f"no such command '{args[0]}' (it is `{ctx.command_path} {RENAMED[args[0]]}` "
                                   "now)", ctx)
        return super().resolve_command(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra) -> int:
        code = self._exit_status(args, prog_name or self.name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _exit_status(self, args, prog_name, complete_var, **extra) -> int:
        from spectrt.runtime.errors import SpectrtError

        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:  # BadParameter, NoSuchOption, MissingParameter, ...
            click.echo(_error_line(e), err=True)
            return e.exit_code
        except click.ClickException as e:  # CommandFailed: SpectrtError inside a command
            e.show()
            return e.exit_code
        except click.Abort as e:
            interrupted = isinstance(e.__cause__ or e.__context__, KeyboardInterrupt)
            click.echo(f"{prog_name}: {'interrupted' if interrupted else 'aborted'}", err=True)
            return 130 if interrupted else 1
        except KeyboardInterrupt:
            click.echo(f"{prog_name}: interrupted", err=True)
            return 130
        except SpectrtError as e:  # outside a command body (a parameter callback, say)
            click.echo(f"{prog_name}: error: {one_line(e)}", err=True)
            return 2
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


@click.group("spectrt", cls=LazyGroup, lazy_commands=COMMANDS,
             context_settings={"show_default": True, "help_option_names": ["-h", "--help"],
                               "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="spectrt", message="%(prog)s %(version)s")
def cli() -> None:
    """Speculative decoding (Medusa, Hydra, VocabTrim): export to ONNX, run on the edge with ONNX Runtime
    or TensorRT.

    Exit status: 0 ok, 1 a failed check or benchmark, 2 bad input (one line on stderr), 130 interrupted.

    \b
    Shell completion (click's standard _SPECTRT_COMPLETE variable), e.g. in ~/.bashrc:
      eval "$(_SPECTRT_COMPLETE=bash_source spectrt)"
    (zsh_source for zsh, fish_source for fish)
    """


def main(argv: list[str] | None = None) -> int:
    """Run `spectrt` with ``argv`` (default: sys.argv[1:]); returns the exit status instead of exiting."""
    return cli.main(args=argv, prog_name="spectrt", standalone_mode=False)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
