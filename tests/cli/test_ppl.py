"""`cascadectl ppl` end to end on a tiny model: outputs, streams, errors and exit codes."""
import json

import pytest

from cascadectl.commands import ppl as ppl_command
from tests.cli.fakes import fake_lm, invoke

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 12
SMALL = ["--cache-size", "128", "--stride", "32", "--sinks", "4", "--cascades", "4"]


pytestmark = pytest.mark.usefixtures("tiny")  # the tiny fake model for every command (tests/conftest.py)



def test_file_prints_llama_cpp_line_on_stdout(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    result = invoke(["ppl", str(path), *SMALL])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Final estimate: PPL = ")
    assert "+/-" in result.stdout.splitlines()[0]
    assert "bits/byte" in result.stdout and "KV cache" in result.stdout


@pytest.mark.parametrize("how", ["file", "stdin", "dash"])
def test_same_text_any_way_gives_same_ppl(tmp_path, how):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    expected = json.loads(invoke(["ppl", str(path), *SMALL, "--json"]).stdout)["results"][0]["ppl"]
    args = {"file": [str(path)], "stdin": [], "dash": ["-"]}[how]
    result = invoke(["ppl", *args, *SMALL, "--json"], input=TEXT if how != "file" else None)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["ppl"] == expected


def test_compare_policies_on_same_tokens(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    result = invoke(["ppl", str(path), *SMALL, "--compare", "full,sink,cascade", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    ppl = {r["policy"]: r for r in doc["results"]}
    assert set(ppl) == {"full", "sink", "cascade"}
    assert len({r["tokens"] for r in doc["results"]}) == 1
    assert ppl["full"]["ppl"] != ppl["sink"]["ppl"]  # the input is longer than the cache: sink evicts
    for key in ("peak_rss_bytes", "input", "model", "versions"):
        assert key in doc
    table = invoke(["ppl", str(path), *SMALL, "--compare", "sink,cascade"])
    assert "ΔPPL" in table.stdout and "[cascade] Final estimate: PPL" in table.stdout


def test_full_refused_past_position_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(ppl_command, "load_model", lambda *a, **k: fake_lm(max_positions=256))
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    result = invoke(["ppl", str(path), *SMALL, "--compare", "full,cascade"])
    assert result.exit_code == 2
    assert "--policy full" in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--stride", "4096", "--cache-size", "128"], "--stride"),
        (["--cache-size", "100", "--cascades", "3"], "--cache-size"),
        (["--policy", "lru"], "--policy"),
        (["--beta", "1.5"], "--beta"),
        (["--cache-size", "7000", "--stride", "1200"], "--cache-size"),  # positions past the 8192 limit
    ],
)
def test_impossible_settings_name_the_flag(tmp_path, args, flag):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    result = invoke(["ppl", str(path), *args])
    assert result.exit_code == 2, result.output
    assert flag in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_missing_file_is_one_line_exit_1(tmp_path):
    result = invoke(["ppl", str(tmp_path / "nope.txt")])
    assert result.exit_code == 1
    assert "nope.txt" in result.stderr and result.stdout == ""


def test_error_keeps_brackets_in_paths(tmp_path):
    """Error lines are printed literally, not as rich markup: a path like `notes[draft].txt` stays whole."""
    result = invoke(["ppl", str(tmp_path / "notes[draft].txt"), *SMALL])
    assert result.exit_code != 0
    assert "notes[draft].txt" in result.stderr
