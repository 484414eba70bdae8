"""`--scores` on the commands that read through a cache: accepted, recorded, and refused with the setting named."""
import json

import pytest

from tests.cli.fakes import invoke

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 12
SMALL = ["--cache-size", "128", "--stride", "32", "--sinks", "4", "--cascades", "4"]

pytestmark = pytest.mark.usefixtures("tiny")  # the tiny fake model for every command (tests/conftest.py)


def test_ppl_last_r_runs_and_differs_only_in_eviction(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    ppl = {}
    for scores in ("exact", "last:32", "last:2"):
        result = invoke(["ppl", str(path), *SMALL, "--scores", scores, "--json"])
        assert result.exit_code == 0, result.output
        ppl[scores] = json.loads(result.stdout)["results"][0]["ppl"]
    assert ppl["last:32"] == ppl["exact"]  # R >= the stride: every query, the exact weights
    assert ppl["last:2"] != ppl["exact"]  # the input is longer than the cache: other tokens were evicted


@pytest.mark.parametrize("command", ["ppl", "summarize"])
def test_malformed_is_refused_naming_the_option(tmp_path, command):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    result = invoke([command, str(path), *SMALL, "--scores", "last:0"])
    assert result.exit_code != 0
    assert "--scores" in result.output and "Traceback" not in result.output


def test_bench_retention_records_it():
    result = invoke(["bench", "retention", "--quick", "--policy", "cascade", "--cache-size", "64", "--stride", "16",
                     "--sinks", "4", "--scores", "last:4", "--samples", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["cache"]["scores"] == "last:4"
