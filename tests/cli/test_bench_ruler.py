"""`cascadectl bench ruler` and the cascade+evidence policy of `bench passkey`, on a tiny model."""
import json

import pytest

from tests.cli.fakes import invoke
from tests.cli.test_bench import CACHE, one_line_error

RULER = ["bench", "ruler", "--lengths", "700", *CACHE]
EVIDENCE = ["--evidence", "32"]  # the default (1/8 of the cache in 32-token spans) is 0 for a 128-token cache


pytestmark = pytest.mark.usefixtures("tiny")  # the tiny fake model for every command (tests/conftest.py)


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("CASCADECTL_HOME", str(tmp_path / "home"))  # the retrieval layers' calibration file



@pytest.mark.parametrize("task", ["multikey", "multivalue", "vartrack"])
def test_quick_grid_of_each_task_prints_the_documented_json(task):
    result = invoke([*RULER, "--quick", "--tasks", task, "--policy", "full,cascade+evidence", *EVIDENCE, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["bench"] == "ruler"
    s = doc["settings"]
    assert (s["tasks"], s["lengths"], s["samples"], s["prompts"]) == ([task], [700], 1, ["first"])
    assert s["policies"] == ["full", "cascade+evidence"] and s["evidence"] == 32 and s["evidence_layers"]
    assert s["max_tokens"] == {task: {"multikey": 12, "multivalue": 32, "vartrack": 32}[task]}
    assert s["cache"]["cache_size"] == 128 and (s["keys"], s["values"], s["hops"]) == (4, 4, 4)
    assert [(c["task"], c["policy"], c["prompt"], c["length"], c["samples"]) for c in doc["summary"]] == [
        (task, "full", "first", 700, 1), (task, "cascade+evidence", "first", 700, 1)]
    assert all(0 <= c["score"] <= 1 and 0 <= c["exact"] <= 1 for c in doc["summary"])
    assert [(m["policy"], m["tasks"]) for m in doc["means"]] == [("full", [task]), ("cascade+evidence", [task])]
    assert len(doc["results"]) == 2 and doc["skipped"] == []
    for r in doc["results"]:
        assert set(r) == {"task", "policy", "prompt", "length", "sample", "query", "expected", "answer", "found",
                          "score", "exact", "fact_positions", "tokens", "seconds"}
        assert r["tokens"] == 700 and r["score"] == len(r["found"]) / len(r["expected"])
        assert isinstance(r["exact"], bool) and set(r["found"]) <= set(r["expected"])
    assert doc["results"][0]["expected"] == doc["results"][1]["expected"]  # one sample for every policy
    assert {"id", "hash", "max_positions"} <= set(doc["model"]) and "versions" in doc
    assert "RULER-style tasks, question first: mean score (exact)" in result.stderr
    assert "note: cascade+evidence reads in chunks of 24 tokens" in result.stderr


def test_table_means_and_what_is_skipped(tiny):
    tiny["n"] = 1120  # multikey (12 tokens decoded) fits full attention at 1,100 tokens, vartrack (32) does not
    result = invoke([*RULER, "--lengths", "1100", "--tasks", "multikey,vartrack", "--samples", "1",
                     "--prompt", "first,last", "--policy", "full,cascade+evidence", *EVIDENCE, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["skipped"] == [
        {"policy": "cascade+evidence", "prompt": "last", "reason": "needs the question first (--prompt first)"},
        {"policy": "full", "length": 1100, "task": "vartrack", "reason": "needs 1,132 positions, the model has 1,120"}]
    ran = {(r["task"], r["policy"], r["prompt"]) for r in doc["results"]}
    assert ran == {("multikey", "full", "first"), ("multikey", "full", "last"),
                   ("multikey", "cascade+evidence", "first"), ("vartrack", "cascade+evidence", "first")}
    means = {(m["policy"], m["prompt"]): m for m in doc["means"]}
    assert means["cascade+evidence", "first"]["tasks"] == ["multikey", "vartrack"]
    cells = [c for c in doc["summary"] if (c["policy"], c["prompt"]) == ("cascade+evidence", "first")]
    assert means["cascade+evidence", "first"]["score"] == pytest.approx(sum(c["score"] for c in cells) / 2)
    assert "note: full skipped at 1,100 tokens (vartrack)" in result.stderr
    assert "note: cascade+evidence skipped with the question last" in result.stderr
    assert "question first" in result.stderr and "question last" in result.stderr and "mean" in result.stderr


def test_passkey_compares_cascade_with_evidence_at_equal_memory():
    result = invoke(["bench", "passkey", "--lengths", "600", "--depths", "0.5", "--max-tokens", "4", *CACHE,
                     "--prompt", "first,last", "--policy", "sink,cascade,cascade+evidence", *EVIDENCE, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["settings"]["policies"] == ["sink", "cascade", "cascade+evidence"]
    assert doc["settings"]["evidence"] == 32 and doc["settings"]["cache"]["cache_size"] == 128
    assert [(r["policy"], r["prompt"]) for r in doc["results"]] == [
        ("sink", "first"), ("cascade", "first"), ("cascade+evidence", "first"), ("sink", "last"),
        ("cascade", "last")]
    assert doc["skipped"] == [{"policy": "cascade+evidence", "prompt": "last",
                               "reason": "needs the question first (--prompt first)"}]
    assert "cascade+evidence" in result.stderr.split("passkey, question first")[1]


@pytest.mark.parametrize("args, needle", [
    ([*RULER, "--tasks", "multikey,needle"], "--tasks: 'needle' is not one of multikey, multivalue, vartrack"),
    ([*RULER, "--tasks", "vartrack", "--lengths", "300", "--policy", "sink"],
     "--lengths: 300 tokens cannot hold the prompt and the 5 facts of vartrack (sample 0); use lengths of at least"),
    ([*RULER, "--policy", "sink,h2o"], "--policy: 'h2o' is not one of full, sink, cascade, cascade+evidence"),
    ([*RULER, "--policy", "cascade+evidence"], "--cache-size 128 is too small for the default evidence store"),
    ([*RULER, "--policy", "cascade+evidence", "--evidence", "0"], "--policy cascade+evidence needs --evidence >= 1"),
    ([*RULER, "--policy", "sink", *EVIDENCE], "--evidence applies to --policy cascade+evidence"),
    ([*RULER, "--prompt", "middle"], "--prompt: 'middle' is not one of first, last"),
    ([*RULER, "--samples", "0"], "--samples must be >= 1"),
    ([*RULER, "--max-tokens", "0"], "--max-tokens must be >= 1"),
    ([*RULER, "--filler", "lorem"], "--filler must be noise or prose"),
    (["bench", "passkey", "--policy", "cascade+evidence", *CACHE, "--evidence", "200"],
     "--cache-size (128) - --evidence (200) = -72"),
])
def test_bad_options_exit_2_with_one_line(args, needle):
    one_line_error(invoke(args), 2, needle)
