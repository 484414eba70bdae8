"""--cache-size auto end to end on tiny models: an input that fits is read exactly (the --policy full result,
bit for bit); a longer one through a cascade within the model's positions and --memory."""
import json

import pytest

from cascadectl.commands import ask, ppl, summarize
from tests.cli.fakes import fake_lm, invoke

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 12
LONG = "Mr. Bennet was among the earliest of those who waited on Mr. Bingley, and he always intended it. " * 40


@pytest.fixture
def positions(monkeypatch):
    """Every command loads a tiny model with this many positions (512 unless a test sets another)."""
    limit = {"n": 512}
    for module in (ppl, summarize, ask):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: fake_lm(limit["n"]))
    return limit



def doc(args, input_text):
    result = invoke([*args, "--json"], input=input_text)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("limit", [512, 8192])
def test_ppl_that_fits_is_full_attention(positions, limit):
    positions["n"] = limit
    text = TEXT[:limit - 10]
    auto = doc(["ppl"], text)["results"][0]
    full = doc(["ppl", "--policy", "full"], text)["results"][0]
    assert auto["policy"] == "full" and auto["sizing"]["exact"] and auto["ppl"] == full["ppl"]
    assert auto["sizing"]["exact_up_to"] == limit and full["sizing"] is None


def test_ppl_longer_than_the_positions_streams_through_a_sized_cascade(positions):
    result = doc(["ppl"], LONG)["results"][0]  # ~4K byte tokens, 512 positions
    assert result["policy"] == "cascade" and not result["sizing"]["exact"]
    assert result["sizing"]["bound"] == "positions"
    settings = result["settings"]
    assert settings["effective_sinks"] + settings["cache_size"] + settings["stride"] <= 512
    assert result["tokens"] == len(LONG.encode())


def test_ppl_memory_bound(positions):
    positions["n"] = 1 << 16
    result = doc(["ppl", "--memory", "1MiB"], LONG)["results"][0]
    assert result["policy"] == "cascade" and result["sizing"]["bound"] == "memory"
    assert result["settings"]["cache_size"] * result["sizing"]["kv_bytes_per_token"] <= 1 << 20


def test_compare_never_takes_the_exact_route(positions):
    results = doc(["ppl", "--compare", "sink,cascade"], TEXT)["results"]
    assert [r["policy"] for r in results] == ["sink", "cascade"]
    assert all(not r["sizing"]["exact"] for r in results)


def test_given_cache_size_is_used_as_is(positions):
    result = doc(["ppl", "--cache-size", "128", "--stride", "32", "--sinks", "4"], TEXT)["results"][0]
    assert result["policy"] == "cascade" and result["sizing"] is None and result["settings"]["cache_size"] == 128


@pytest.mark.parametrize("bad", ["lots", "--memory=lots"])
def test_bad_values_are_one_line(positions, bad):
    args = ["ppl", "--cache-size", bad] if bad == "lots" else ["ppl", bad]
    result = invoke(args, input=TEXT)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["summarize"], ["ask", "-", "Who has a fortune?"]])
def test_answers_that_fit_equal_policy_full(positions, command):
    positions["n"] = 2048
    auto = doc([*command, "--max-tokens", "12"], TEXT)
    full = doc([*command, "--max-tokens", "12", "--policy", "full"], TEXT)
    assert auto["answer"] == full["answer"]
    assert auto["record"]["settings"]["policy"] == "full" and auto["record"]["sizing"]["exact"]
    assert auto.get("evidence", []) == []


def test_ask_longer_than_the_positions_keeps_evidence(positions):
    result = doc(["ask", "-", "Who waited on Mr. Bingley?", "--max-tokens", "8"], LONG)
    record = result["record"]
    assert record["settings"]["policy"] == "cascade" and not record["sizing"]["exact"]
    assert record["settings"]["evidence"] > 0
    assert record["settings"]["effective_sinks"] + record["settings"]["cache_size"] + record["settings"]["stride"] \
        <= 512
