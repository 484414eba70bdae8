"""`ask` with an evidence store (tiny model): citations in --json and on stderr, printed literally; resume and
--save-cache/--load-cache carry the store; --evidence 0 and several questions read without one."""
import json

import pytest

from cascadectl.citations import printable
from tests.cli.fakes import invoke

VARIED = ("Mr. Bingley came to Netherfield. The ball was long, and Darcy was proud. " * 30)
FACT = " The code of the vault is 48213. "
SMALL = ["--cache-size", "192", "--cascades", "2", "--sinks", "4", "--stride", "32", "--max-tokens", "6"]


pytestmark = pytest.mark.usefixtures("tiny")  # the tiny fake model for every command (tests/conftest.py)


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("CASCADECTL_HOME", str(tmp_path / "home"))



@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(VARIED[:900] + FACT + VARIED[:1500], encoding="utf-8")
    return path


def _ask(doc, *extra):
    result = invoke(["ask", str(doc), "What is the code of the vault?", *SMALL, "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result


def test_json_lists_the_kept_passages(doc):
    out, _ = _ask(doc, "--evidence", "32")
    text = doc.read_text(encoding="utf-8")
    assert out["record"]["generation"]["evidence"] == 32
    assert out["evidence"], out.keys()
    for r in out["evidence"]:
        assert set(r) == {"source", "page", "line", "token_start", "token_end", "text", "score", "quoted"}
        assert r["source"] == str(doc) and r["page"] is None
        assert 0 <= r["token_start"] < r["token_end"] <= out["stats"]["tokens"]
        assert r["text"] in text  # the byte tokenizer: a span is a piece of the file
        if r["line"] is not None:
            assert r["line"] == text[: text.index(r["text"].strip())].count("\n") + 1


def test_evidence_off(doc):
    out, _ = _ask(doc, "--evidence", "0")
    assert out["evidence"] == [] and out["record"]["generation"]["evidence"] == 0


def test_several_questions_each_get_their_own_store(doc):
    """One question-agnostic ingest; question k's passages come from its share of the store, and its answer
    is read from a copy that holds only those."""
    questions = ["What is the code of the vault?", "Who came to Netherfield?", "Was Darcy proud?"]
    args = ["ask", str(doc), *(x for q in questions for x in ("-q", q)), *SMALL, "--json"]
    result = invoke([*args, "--evidence", "96"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["record"]["generation"]["evidence"] == 96 and not out["record"]["generation"]["question_first"]
    assert [a["question"] for a in out["answers"]] == questions
    assert all(a["evidence"] for a in out["answers"])
    assert out["evidence"] == [r for a in out["answers"] for r in a["evidence"]]
    assert sorted({r["question"] for r in out["evidence"]}) == [0, 1, 2]
    text = doc.read_text(encoding="utf-8")
    assert all(r["text"] in text for r in out["evidence"])
    off = json.loads(invoke([*args, "--evidence", "0"]).stdout)  # the old question-agnostic read, no store
    assert off["evidence"] == [] and all(a["evidence"] == [] for a in off["answers"])
    assert off["record"]["settings"]["evidence"] == 0


def test_citations_on_stderr_are_literal(tmp_path):
    """A document full of ANSI escapes and rich markup: the passages reach stderr as inert text."""
    hostile = "\x1b[31mred\x1b[0m [bold]loud[/bold] [link=http://x]y[/link] \x07\x1b]0;title\x07 " * 40
    path = tmp_path / "hostile.txt"
    path.write_text(hostile + FACT + hostile, encoding="utf-8")
    result = invoke(["ask", str(path), "What is the code of the vault?", *SMALL, "--evidence", "32", "--report"])
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "Evidence" in err
    assert "\x1b" not in err and "\x07" not in err
    lines = [line for line in err.splitlines() if "score" in line and "tokens" in line]
    assert lines and any(m in line for line in lines for m in ("[bold]", "[/bold]", "[link=", "\\x1b")), lines


def test_printable():
    assert printable("a\x1b[31mb\n\n c\u202e") == "a\\x1b[31mb c\\u202e"


def test_save_and_load_carry_the_store(doc, tmp_path):
    saved = tmp_path / "c.kv"
    out, _ = _ask(doc, "--evidence", "32", "--question-first", "--save-cache", str(saved))
    result = invoke(["ask", "--load-cache", str(saved), "What is the code of the vault?", "--json",
                     "--max-tokens", "6"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)
    assert again["answer"] == out["answer"]
    assert again["evidence"] == out["evidence"]
    assert "holds no evidence" not in result.stderr


def test_load_without_evidence_says_so(doc, tmp_path):
    saved = tmp_path / "plain.kv"
    _ask(doc, "--no-question-first", "--evidence", "0", "--save-cache", str(saved))
    result = invoke(["ask", "--load-cache", str(saved), "What is the code of the vault?", "--max-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "holds no evidence" in result.stderr


def test_a_saved_cache_answers_any_question_with_the_evidence_of_its_own(doc, tmp_path):
    """--save-cache reads without pinning the question, so the file answers any question; the questions it was
    read with keep their evidence, another one is told in one line that it has none."""
    saved = tmp_path / "any.kv"
    out, _ = _ask(doc, "--evidence", "32", "--save-cache", str(saved))
    assert out["evidence"] and not out["record"]["generation"]["question_first"]
    same = invoke(["ask", "--load-cache", str(saved), "What is the code of the vault?", "--json", "--max-tokens", "6"])
    assert same.exit_code == 0, same.output
    again = json.loads(same.stdout)
    assert again["answer"] == out["answer"] and again["answers"][0]["evidence"] == out["answers"][0]["evidence"]
    assert "holds no evidence" not in same.stderr
    other = invoke(["ask", "--load-cache", str(saved), "Who came to Netherfield?", "--json", "--max-tokens", "6"])
    assert other.exit_code == 0, other.output
    assert "holds no evidence for" in other.stderr and json.loads(other.stdout)["answers"][0]["evidence"] == []


def test_quoted_passages_close_the_request(doc):
    """When the cache evicted, the strongest passages are quoted before the question (as many as fit the newest
    sub-cache with --max-tokens), and their records say so; --quote 0 is the plain request."""
    wide = ["--cache-size", "1024", "--cascades", "2", "--sinks", "4", "--stride", "32", "--max-tokens", "6",
            "--evidence", "64", "--json"]
    result = invoke(["ask", str(doc), "What is the code of the vault?", *wide])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["stats"]["tokens"] > 1024 and out["record"]["generation"]["quote"] == 8
    quoted = [r for r in out["evidence"] if r["quoted"]]
    assert quoted and quoted == sorted(out["evidence"], key=lambda r: -r["score"])[: len(quoted)]
    plain = json.loads(invoke(["ask", str(doc), "What is the code of the vault?", *wide, "--quote", "0"]).stdout)
    assert not any(r["quoted"] for r in plain["evidence"])
    assert [dict(r, quoted=False) for r in out["evidence"]] == plain["evidence"]  # the same store either way
