"""Prompt JSONL files (bench, distill, calibrate): every malformed line is a one-line ``FILE:LINE:`` error."""
from __future__ import annotations

import pytest

from spectrt.calibration.prompts import load_prompt_records, load_prompts
from spectrt.runtime.errors import SpectrtError


def test_records_and_categories(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('\ufeff{"prompt": "a", "category": "math"}\n\n{"turns": ["b", "b2"], "category": "qa"}\n'
                 '{"prompt": "c"}\n', encoding="utf-8")
    assert load_prompt_records(f) == [("math", "a"), ("qa", "b"), (None, "c")]


@pytest.mark.parametrize("line, message", [
    ('["a", "b"]', "got a JSON array; expected one JSON object per line"),
    ("42", "got a JSON number"),
    ('"just a string"', "got a JSON string"),
    ("null", "got a JSON null"),
    ("true", "got a JSON boolean"),
    ('{"prompt": ["a"]}', "'prompt' must be a string, got a JSON array"),
    ('{"prompt": null}', "'prompt' must be a string, got a JSON null"),
    ('{"prompt": "  "}', "empty 'prompt'"),
    ('{"turns": "one turn"}', "'turns' must be a non-empty list of strings, got a JSON string"),
    ('{"turns": []}', "'turns' must be a non-empty list of strings, got an empty array"),
    ('{"turns": ["ok", 3]}', r"'turns' must be a non-empty list of strings, turns\[1\] is a JSON number"),
    ('{"turns": [{"role": "user"}]}', r"'turns' must be a non-empty list of strings, turns\[0\] is a JSON object"),
    ('{"prompt": "x", "category": 7}', "'category' must be a string"),
    ('{"text": "x"}', r"no 'prompt' or 'turns' field \(fields: text\)"),
    ("{oops", "not valid JSON"),
])
def test_bad_line_names_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "fine"}\n\n' + line + "\n")
    with pytest.raises(SpectrtError, match=r"bad\.jsonl:3: " + message) as e:
        load_prompt_records(f)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file(tmp_path, content):
    f = tmp_path / "empty.jsonl"
    f.write_text(content)
    with pytest.raises(SpectrtError, match=r"empty\.jsonl: no prompts \(the file is empty or blank"):
        load_prompts(f)


def test_bench_cli_bad_prompts_line(tmp_path, capsys):
    """`spectrt bench --prompts FILE` with a JSON array line: exit 2, one line, nothing written."""
    from spectrt.cli import main

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n["not", "an", "object"]\n')
    out = tmp_path / "bench.json"
    rc = main(["bench", str(tmp_path / "art"), "--prompts", str(f), "--json", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("spectrt bench: error: ") and "p.jsonl:2: got a JSON array" in err, err
    assert not out.exists()
