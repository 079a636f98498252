"""The `spectrt` command line: honest help, one-line errors with exit status 2, strict JSON, lazy imports."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from spectrt.cli import COMMANDS, cli, main

# every command path, groups included
COMMAND_PATHS = [[]] + [[c] for c in COMMANDS] + [["calibrate", "vocab"], ["calibrate", "tree"]]


def _command(path: list[str]) -> tuple[click.Command, click.Context]:
    ctx = click.Context(cli, info_name="spectrt", show_default=True)
    cmd = cli
    for name in path:
        cmd = cmd.get_command(ctx, name)
        ctx = click.Context(cmd, info_name=name, parent=ctx)
    return cmd, ctx


def _strict_json(text: str):
    def no_constants(name):
        raise AssertionError(f"not RFC 8259 JSON: {name}")

    return json.loads(text, parse_constant=no_constants)


def _one_line_error(capsys, argv, where: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err + captured.out
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"{where}: error: "), err
    return err


def test_import_cli_and_every_command_without_torch():
    code = ("import sys, spectrt.cli, spectrt.runtime\n"
            "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'onnx'})\n"
            "assert not heavy(), heavy()\n"
            "from spectrt.cli import cli, COMMANDS\n"
            "import click\n"
            "ctx = click.Context(cli)\n"
            "assert all(cli.get_command(ctx, c) is not None for c in COMMANDS)\n"
            "assert not heavy(), heavy()\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "spectrt")
def test_help_of_every_command(path):
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="spectrt")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: {' '.join(['spectrt', *path])} ")
    out = " ".join(result.output.split())
    assert "default: True" not in out and "default: False" not in out
    cmd, ctx = _command(path)
    for param in cmd.params:
        record = param.get_help_record(ctx)
        if record is None:  # arguments
            continue
        opts, text = record
        assert text.count("default:") <= 1 and "(default" not in text.lower(), (opts, text)
        if isinstance(param, click.Option) and not param.is_flag and not param.required:
            default = param.get_default(ctx, call=False)
            if default is not None and default != ():
                assert "[default: " in text, f"{opts}: default {default!r} not shown"
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"{opts} has no help text"


def _help(*path: str) -> str:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0
    return " ".join(result.output.split())  # unwrapped


def test_negative_flags_show_the_default_once():
    out = _help("export")
    assert "--validate / --no-validate" in out and "[default: validate]" in out
    assert "--no-heads export the base model only --topk" in out  # no default shown for a plain flag
    out = _help("generate")
    assert "--chat / --no-chat" in out and "[default: chat]" in out
    assert "[default: (on when the CPU has native bf16)]" in _help("distill")
    for path in (["export"], ["generate"], ["distill"], ["bench"], ["check"], ["build"]):
        assert "True" not in _help(*path) and "False" not in _help(*path)


def test_prompt_and_max_new_tokens_have_help():
    cmd, ctx = _command(["generate"])
    helps = {p.name: p.get_help_record(ctx) for p in cmd.params if isinstance(p, click.Option)}
    assert "prompt" in helps["prompt"][1] and "new tokens" in helps["max_new_tokens"][1]
    assert "x>=1" in helps["max_new_tokens"][1]


@pytest.mark.parametrize("argv, message", [
    (["generate", "DIR", "-p", "hi", "-n", "0"], "-n/--max-new-tokens must be at least 1, not 0"),
    (["generate", "DIR", "-p", "hi", "-n", "-5"], "-n/--max-new-tokens must be at least 1, not -5"),
    (["generate", "DIR", "-p", "hi", "--max-context", "-3"], "--max-context must be at least 1, not -3"),
    (["generate", "DIR", "-p", "hi", "--threads", "0"], "--threads must be at least 1"),
    (["generate", "DIR", "-p", "hi", "-n", "many"], "'many' is not a valid integer"),
    (["generate", "DIR", "-p", "hi", "--mode", "fast"], "'fast' is not one of 'spec', 'ar'"),
    (["generate", "DIR"], "give the prompt with -p/--prompt or a conversation with --messages (one of them)"),
    (["bench", "DIR", "--stride", "0"], "--stride must be at least 1, not 0"),
    (["bench", "DIR", "-n", "0"], "-n/--max-new-tokens must be at least 1, not 0"),
    (["bench", "DIR", "--limit", "0"], "--limit must be at least 1, not 0"),
    (["bench", "DIR", "--vocab-sweep", "100,lots"], "takes sizes like 1000,4000,full"),
    (["bench", "DIR", "--vocab-sweep", "100,full"], "--vocab-sweep needs --vocab"),
    (["bench"], "Missing argument 'DIR...'"),
    (["export", "-o", "OUT", "--opset", "22"], "--opset must be in [13, 21], not 22"),
    (["export", "-o", "OUT", "--weights", "int3"], "'int3' is not one of 'float', 'int8', 'int4'"),
    (["export", "-o", "OUT", "--weights", "int4", "--block", "48"], "'48' is not one of '32', '64', '128'"),
    (["export", "-o", "OUT", "--max-context", "1"], "--max-context must be at least 2, not 1"),
    (["export", "-o", "OUT", "--topk", "0"], "--topk must be at least 1"),
    (["export", "-o", "OUT", "--vocab-size", "0"], "--vocab-size must be at least 1"),
    (["distill", "-m", "M", "--prompts", "P", "-o", "O", "--lr", "0"], "--lr must be greater than 0, not 0"),
    (["distill", "-m", "M", "--prompts", "P", "-o", "O", "--holdout", "1"], "--holdout must be in [0, 1), not 1"),
    (["calibrate", "vocab", "-o", "V", "--coverage", "1.5"], "--coverage must be in (0, 1], not 1.5"),
    (["calibrate", "vocab", "-o", "V", "--size", "9", "--coverage", "0.5"], "mutually exclusive"),
    (["calibrate", "tree", "DIR", "--max-nodes", "1"], "--max-nodes must be at least 2, not 1"),
    (["calibrate", "tree", "DIR", "--timings", "T", "--profile", "rtx-4090"], "pass one"),
    (["check", "DIR", "--profile", "agx-thor", "--trt-version", "10.3"], "mutually exclusive"),
    (["profile", "DIR", "--iterations", "0"], "--iterations must be at least 1"),
    (["devices", "--artifact", "DIR"], "--artifact needs a profile NAME"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    where = " ".join(["spectrt", *argv[:2]] if argv[0] == "calibrate" else ["spectrt", argv[0]])
    assert message in _one_line_error(capsys, argv, where)


def test_standalone_mode_exits_like_main():
    """The console script and CliRunner (standalone mode) give the same one line and status as main()."""
    result = CliRunner().invoke(cli, ["bench", "DIR", "-n", "0"])
    assert result.exit_code == 2
    assert result.output == "spectrt bench: error: -n/--max-new-tokens must be at least 1, not 0\n"
    assert "speedup" not in result.output
    assert CliRunner().invoke(cli, ["--version"]).exit_code == 0


def test_spectrt_error_is_one_line(capsys, tmp_path):
    err = _one_line_error(capsys, ["generate", str(tmp_path / "missing"), "-p", "hi"], "spectrt generate")
    assert "missing" in err
    assert "unknown device profile" in _one_line_error(capsys, ["devices", "no-such-board"], "spectrt devices")


def test_exit_statuses_of_main(capsys):
    from spectrt.version import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"spectrt {__version__}\n"
    assert main(["--help"]) == 0 and main(["-h"]) == 0
    assert "_SPECTRT_COMPLETE" in capsys.readouterr().out
    assert main([]) == 2  # the help, on stderr
    assert "Usage: spectrt" in capsys.readouterr().err
    assert main(["calibrate"]) == 2
    assert "vocab" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_interrupt_exits_130(capsys, monkeypatch):
    import spectrt.profiles

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(spectrt.profiles, "list_profiles", interrupted)
    assert main(["devices"]) == 130
    assert capsys.readouterr().err == "spectrt devices: interrupted\n"


def test_devices_lists_and_shows_profiles(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in ("orin-nano-8gb", "agx-thor", "rtx-4090"))
    assert "spectrt devices NAME" in out
    assert main(["devices", "orin-nano-8gb"]) == 0
    out = capsys.readouterr().out
    assert "orin-nano-8gb" in out and "8.7" in out


def test_profiles_is_no_longer_a_command(capsys):
    assert "profiles" not in COMMANDS and "profiles" not in cli.list_commands(click.Context(cli))
    err = _one_line_error(capsys, ["profiles"], "spectrt")
    assert "spectrt devices" in err
    assert main(["profile", "--help"]) == 0  # `profile` (timing) keeps its name
    assert "Polygraphy" in capsys.readouterr().out


def test_shell_completion():
    runner = CliRunner()
    script = runner.invoke(cli, [], prog_name="spectrt", env={"_SPECTRT_COMPLETE": "bash_source"})
    assert script.exit_code == 0 and "_SPECTRT_COMPLETE=bash_complete" in script.output
    env = {"_SPECTRT_COMPLETE": "bash_complete", "COMP_WORDS": "spectrt dev", "COMP_CWORD": "1"}
    assert runner.invoke(cli, [], prog_name="spectrt", env=env).output.split() == ["plain,devices"]
    env = {"_SPECTRT_COMPLETE": "bash_complete", "COMP_WORDS": "spectrt devices orin-n", "COMP_CWORD": "2"}
    assert "plain,orin-nano-8gb" in runner.invoke(cli, [], prog_name="spectrt", env=env).output.split()


def test_to_json_is_rfc8259():
    import numpy as np

    from spectrt.commands._common import to_json

    text = to_json({"tau": math.nan, "tok_s": [math.inf, -math.inf, 1.5], "np": np.float32("nan"), "n": np.int64(3)})
    assert _strict_json(text) == {"tau": None, "tok_s": [None, None, 1.5], "np": None, "n": 3}


def test_distill_defaults_are_distill_config():
    """The explicit defaults in the help are DistillConfig's, and hydra/hydra++ keep their own."""
    from spectrt.calibration.config import DistillConfig
    from spectrt.commands.distill import command, config_from_options

    def config(*argv):
        ctx = command.make_context("distill", ["-m", "M", "--prompts", "P", "-o", "O", *argv])
        opts = {k: v for k, v in ctx.params.items() if k not in ("model", "prompts", "output", "quiet")}
        return config_from_options(**opts)

    expected = DistillConfig()
    expected.validate()
    assert config() == expected
    assert config("--fp32", "--no-bf16", "--heads", "5").half is False
    hydra = config("--arch", "hydra")
    assert (hydra.layers, hydra.loss, hydra.dropout) == (2, "lm", 0.0)
    hydra_pp = config("--arch", "hydra++", "--bf16")
    assert (hydra_pp.loss, hydra_pp.dropout, hydra_pp.bf16) == ("teacher", 0.1, True)


def test_graphs_take_commas_or_repeats():
    from spectrt.commands._common import flatten
    from spectrt.commands.build import command

    ctx = command.make_context("build", ["DIR", "--profile", "agx-thor", "--graphs", "base,heads", "--graphs", "x"])
    assert flatten(ctx.params["graphs"]) == ["base", "heads", "x"]
    assert flatten(command.make_context("build", ["DIR", "--profile", "agx-thor"]).params["graphs"]) is None


def test_generate_json_is_strict(tiny_exports):
    result = CliRunner().invoke(cli, ["generate", str(tiny_exports["llama"]), "-p", "hi", "-n", "4", "--json",
                                      "--no-chat"])
    assert result.exit_code == 0, result.output
    stats = _strict_json(result.output)
    assert stats["new_tokens"] >= 1 and stats["mode"] in ("ar", "spec")
