"""End to end on the embedded model: a planted fact found far outside the cache window, a multi-page PDF summarized.

These run the real CLI on SmolLM2-135M-Instruct (bf16, CPU) with small caches so that they take seconds, not
minutes. They assert behaviour that the settings make structural, and say so where a result depends on the model.
"""
import json
from pathlib import Path

import pytest

from tests.cli.pdfs import write_pdf
from tests.cli.fakes import invoke

BOOK = Path(__file__).resolve().parents[2] / "data" / "pride_and_prejudice.txt"
FACT = "\n\nImportant: the password of the library is banana. Remember it.\n\n"
QUESTION = "What is the password of the library?"
# cache 512 in 8 sub-caches of 64 slots reaches ~64·255 = 16K tokens back; the fact sits ~2.1K tokens (4× the
# cache, 33× the newest sub-cache) before the end, where a 512-token sliding window cannot see it
SMALL = ["--cache-size", "512", "--cascades", "8", "--stride", "128", "--max-tokens", "16", "--json"]



@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """~3K tokens of the novel with one sentence planted at 30% depth."""
    body = BOOK.read_text(encoding="utf-8")[20000:32000]
    at = int(len(body) * 0.3)
    path = tmp_path_factory.mktemp("planted") / "chapter.txt"
    path.write_text(body[:at] + FACT + body[at:], encoding="utf-8")
    return path


def _ask(path, *extra):
    result = invoke(["ask", str(path), QUESTION, *SMALL, *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_planted_fact_is_found_far_outside_the_window(planted):
    """Question-first cascade: the answer names the planted word; the sliding window of the same size cannot.

    One fixed input, a regression check of the whole path (guided scores -> retention -> answer), not a rate: on the
    135M model this retrieval is marginal (by hand, the same word at 20% and 40% depth was not found; the rates over
    many samples are measured by `cascadectl bench passkey`, see docs/RESULTS.md). λ = 10 as found by hand."""
    doc = _ask(planted, "--question-weight", "10")
    assert doc["stats"]["tokens"] > 4 * 512
    assert "banana" in doc["answer"].lower(), doc["answer"]
    assert doc["retention"]["question_guided"]

    window = _ask(planted, "--policy", "sink")
    assert "banana" not in window["answer"].lower(), window["answer"]


def test_summarize_multi_page_pdf(tmp_path):
    """A 12-page PDF built here: every page is read (page markers in the report), the summary is not empty."""
    text = BOOK.read_text(encoding="utf-8")[5000:25000]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    pages = ["\n".join(lines[i : i + 18]) for i in range(0, 12 * 18, 18)]
    pdf = write_pdf(tmp_path / "book.pdf", pages)
    result = invoke(["summarize", str(pdf), "--cache-size", "512", "--stride", "256", "--max-tokens", "24",
                     "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["answer"].strip()
    assert doc["record"]["input"]["pages"] == 12
    assert len(doc["retention"]["by_page"]) == 12
    assert doc["stats"]["tokens"] > 512 + 256  # longer than the cache: something was evicted and reported
    assert doc["retention"]["kept_layer0"] < doc["stats"]["tokens"]


VAULT = " The code of the vault is 48213. "


@pytest.fixture(scope="module")
def far_back(tmp_path_factory):
    """~6K tokens of the novel with a 5-digit fact at 20% depth: 12x the 512-token cache, ~4.8K tokens back."""
    body = BOOK.read_text(encoding="utf-8")[40000:66000]
    at = body.index(". ", int(len(body) * 0.2)) + 1
    path = tmp_path_factory.mktemp("vault") / "book.txt"
    path.write_text(body[:at] + VAULT + body[at:], encoding="utf-8")
    return path


def test_evidence_keeps_a_five_digit_fact_far_back(far_back):
    """The default evidence store keeps the fact's sentence whole and cites it; the cascade alone (same memory)
    keeps at most a few of its digits (tests/engine/test_cascade_rule.py)."""
    args = ["ask", str(far_back), "What is the code of the vault?", "--cache-size", "512", "--stride", "256",
            "--max-tokens", "12", "--json"]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["stats"]["tokens"] > 10 * 512
    assert "48213" in doc["answer"], doc["answer"]
    cited = [e for e in doc["evidence"] if "48213" in e["text"]]
    assert cited and cited[0]["source"] == str(far_back) and cited[0]["line"] is not None
    plain = json.loads(invoke([*args, "--evidence", "0"]).stdout)
    assert "48213" not in plain["answer"], plain["answer"]
    assert plain["evidence"] == []
