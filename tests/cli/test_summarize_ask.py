"""`cascadectl summarize` and `ask` end to end on a tiny model; one run on the embedded model."""
import json
from pathlib import Path

import pytest

from tests.cli.fakes import invoke

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 8
SMALL = ["--cache-size", "128", "--stride", "32", "--sinks", "4", "--cascades", "4", "--max-tokens", "12"]
BOOK = Path(__file__).resolve().parents[2] / "data" / "pride_and_prejudice.txt"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    return str(path)



def test_summarize_stdout_is_only_the_answer(tiny, text_file):
    doc = json.loads(invoke(["summarize", text_file, *SMALL, "--json"]).stdout)
    result = invoke(["summarize", text_file, *SMALL])
    assert result.exit_code == 0, result.output
    assert result.stdout == doc["answer"] + "\n"
    assert "tok/s" in result.stderr and "KV cache" in result.stderr and "peak memory" in result.stderr
    assert "Retention" not in result.stderr
    quiet = invoke(["summarize", text_file, *SMALL, "--quiet"])
    assert quiet.stdout == result.stdout and quiet.stderr == ""


@pytest.mark.parametrize("how", ["stdin", "dash"])
def test_same_text_from_stdin_gives_the_same_summary(tiny, text_file, how):
    expected = json.loads(invoke(["summarize", text_file, *SMALL, "--json"]).stdout)
    args = [] if how == "stdin" else ["-"]
    result = invoke(["summarize", *args, *SMALL, "--json"], input=TEXT)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["answer"] == expected["answer"]
    assert got["record"]["input_sha256"] == expected["record"]["input_sha256"]
    assert got["retention"]["by_tenth"] == expected["retention"]["by_tenth"]


def test_json_schema(tiny, text_file):
    result = invoke(["summarize", text_file, *SMALL, "--json", "--words", "50"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == {"answer", "stats", "retention", "record"}
    assert {"tokens", "seconds_ingest", "seconds_generate", "tokens_per_s", "peak_rss_bytes",
            "kv_cache_bytes", "generated_tokens"} <= set(doc["stats"])
    assert doc["stats"]["tokens"] == len(TEXT.encode())
    assert doc["stats"]["decode_graph"] is None  # CUDA only
    assert {"input_tokens", "kept_layer0", "kept_mean", "by_file", "by_page", "by_tenth"} <= set(doc["retention"])
    assert len(doc["retention"]["by_tenth"]) == 10
    record = doc["record"]
    assert {"model_id", "model_hash", "dtype", "device", "settings", "input_sha256", "versions"} <= set(record)
    assert record["settings"]["cache_size"] == 128 and record["settings"]["effective_sinks"] > 4
    assert "50 words" in record["generation"]["instruction"]


def test_report_on_stderr(tiny, tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(TEXT)
    result = invoke(["summarize", str(tmp_path), *SMALL, "--report"])
    assert result.exit_code == 0, result.output
    assert "Retention" in result.stderr and "tenth" in result.stderr and "b.txt" in result.stderr
    assert "Retention" not in result.stdout


def test_ask_last_argument_is_the_question(tiny, text_file):
    result = invoke(["ask", text_file, "Who is he?", *SMALL, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["answers"][0]["question"] == "Who is he?" and doc["answer"] == doc["answers"][0]["answer"]
    assert doc["retention"]["question_guided"] is True
    piped = invoke(["ask", "Who is he?", *SMALL, "--json"], input=TEXT)
    assert json.loads(piped.stdout)["answer"] == doc["answer"]


def test_several_questions_share_one_ingest(tiny, text_file):
    """--no-batch: each answer comes from a copy of the same question-agnostic cache, equal to one-question runs."""
    questions = ["Who is he?", "What does he have?"]
    result = invoke(["ask", text_file, "-q", questions[0], "-q", questions[1], *SMALL, "--json", "--no-batch"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [a["question"] for a in doc["answers"]] == questions and "answer" not in doc
    assert doc["retention"]["question_guided"] is False
    assert doc["record"]["generation"]["batch"] is False and doc["stats"]["answer_batch"] is None
    for q, got in zip(questions, doc["answers"]):
        single = json.loads(invoke(["ask", text_file, q, *SMALL, "--no-question-first", "--json",
                                    "--no-batch"]).stdout)
        assert got["answer"] == single["answer"]
    text = invoke(["ask", text_file, "-q", questions[0], "-q", questions[1], *SMALL, "--no-batch"])
    assert text.stdout.startswith(f"## {questions[0]}\n") and f"\n## {questions[1]}\n" in text.stdout


QUESTIONS = ["Who is he?", "What does he have?", "Is it true?"]


def test_several_questions_decode_together(tiny, text_file):
    """The default: one batch per step from the frozen cache. With nothing evicted that is the one-by-one answer
    (both are the model's own attention); the text output prints each answer under its question, in order."""
    qs = [x for q in QUESTIONS for x in ("-q", q)]
    roomy = [*SMALL, "--cache-size", "4096"]
    result = invoke(["ask", text_file, *qs, *roomy, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["record"]["generation"]["batch"] is True
    batch = doc["stats"]["answer_batch"]
    assert batch["questions"] == 3 and 1 <= batch["steps"] <= 11 and batch["frozen_bytes"] > 0
    assert batch["document_tokens"] > doc["stats"]["tokens"]  # nothing evicted: the prompt's prefix and the input
    apart = json.loads(invoke(["ask", text_file, *qs, *roomy, "--json", "--no-batch"]).stdout)
    assert [a["answer"] for a in doc["answers"]] == [a["answer"] for a in apart["answers"]]
    assert all(a["answer"] for a in doc["answers"])
    text = invoke(["ask", text_file, *qs, *roomy])
    want = "\n".join(f"## {a['question']}\n{a['answer']}\n" for a in doc["answers"])
    assert text.exit_code == 0 and text.stdout == want
    result = invoke(["ask", text_file, *qs, *SMALL, "--json"])  # the cache evicted
    evicting = json.loads(result.stdout)
    assert evicting["stats"]["answer_batch"]["document_tokens"] < evicting["stats"]["tokens"]
    assert all(a["answer"] for a in evicting["answers"])
    assert "may be evicted" not in result.stderr  # the frozen cache evicts nothing while answering
    assert "may be evicted" in invoke(["ask", text_file, *qs, *SMALL, "--json", "--no-batch"]).stderr


def test_question_first_changes_what_is_kept(tiny, text_file):
    guided = json.loads(invoke(["ask", text_file, "Who?", *SMALL, "--json"]).stdout)["retention"]
    plain = json.loads(invoke(["ask", text_file, "Who?", *SMALL, "--json", "--question-weight", "0"]).stdout)
    assert guided["question_guided"] and not plain["retention"]["question_guided"]
    assert guided["by_tenth"] != plain["retention"]["by_tenth"]


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["summarize", "/no/such/file.txt"], 1, "no such file"),
        (["summarize", "{file}", "--stride", "4096", "--cache-size", "128"], 2, "--stride"),
        (["summarize", "{file}", "--max-tokens", "0"], 2, "--max-tokens"),
        (["summarize", "{file}", "--policy", "full", "--max-tokens", "9000"], 2, "--max-tokens"),
        (["ask", "{file}"], 2, "question"),
        (["ask", "{file}", "q?", "--question-weight", "-1"], 2, "--question-weight"),
    ],
)
def test_errors_are_one_line_with_exit_codes(tiny, text_file, args, code, needle):
    result = invoke([a.replace("{file}", text_file) for a in args])
    assert result.exit_code == code, result.output
    assert needle in result.stderr and "Traceback" not in result.output
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1


def test_embedded_model_summarizes_a_page():
    """The real model, ~3 KB of the bundled novel: a non-empty summary in a few seconds."""
    result = invoke(["summarize", "-", "--cache-size", "256", "--stride", "128", "--max-tokens", "16", "--json"],
                    input=BOOK.read_text(encoding="utf-8")[:3000])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["answer"].strip()
    assert doc["stats"]["tokens"] > 500 and doc["retention"]["kept_layer0"] <= 256 + 64
    assert doc["record"]["model_id"].startswith("SmolLM2")


def test_one_answer_comes_from_the_frozen_cache(tiny, text_file, monkeypatch):
    """`summarize` and `ask` with one question answer from the frozen cache (a batch of one): with nothing evicted
    that is the evicting path's answer (both the model's own attention), the text output is the bare answer, and
    a frozen copy that would not fit in free memory falls back to the evicting cache with one line on stderr, and
    with the held-back warning that the request may be evicted."""
    import engine.batch_answer as batch_answer
    roomy = [*SMALL, "--cache-size", "4096"]
    for cmd in (["summarize", text_file], ["ask", text_file, "Who is he?"]):
        doc = json.loads(invoke([*cmd, *roomy, "--json"]).stdout)
        assert doc["record"]["generation"]["batch"] is True and doc["answer"]
        assert doc["stats"]["answer_batch"]["questions"] == 1 and doc["stats"]["decode_graph"] is None
        text = invoke([*cmd, *roomy])
        assert text.exit_code == 0 and text.stdout == doc["answer"] + "\n" and "## " not in text.stdout
        with monkeypatch.context() as m:
            m.setattr(batch_answer, "free_bytes", lambda device: 0)
            alone = invoke([*cmd, *roomy, "--json"])
            assert "answering from the evicting cache: the frozen copy of the cache needs" in alone.stderr
            alone = json.loads(alone.stdout)
            assert alone["record"]["generation"]["batch"] is False and alone["stats"]["answer_batch"] is None
            assert alone["answer"] == doc["answer"]
            evicting = invoke([*cmd, *SMALL, "--max-tokens", "200", "--json"])
            assert evicting.exit_code == 0 and "may be evicted" in evicting.stderr
        frozen = invoke([*cmd, *SMALL, "--max-tokens", "200", "--json"])
        assert frozen.exit_code == 0 and "may be evicted" not in frozen.stderr
    assert json.loads(invoke(["ask", text_file, "Who is he?", *roomy, "--json", "--no-batch"]).stdout)["answer"] \
        == json.loads(invoke(["ask", text_file, "Who is he?", *roomy, "--json"]).stdout)["answer"]
