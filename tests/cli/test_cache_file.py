"""`--save-cache` / `--load-cache`: answers from a saved ingest equal those of a fresh one, and bad files,
other settings and mismatched questions are refused in one line."""
import json
import os
from pathlib import Path

import pytest

from tests.cli.fakes import invoke

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 4
SMALL = ["--cache-size", "192", "--stride", "32", "--sinks", "4", "--cascades", "2"]
GEN = ["--max-tokens", "12"]
BOOK = Path(__file__).resolve().parents[2] / "data" / "pride_and_prejudice.txt"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    return str(path)



def run_json(args) -> dict:
    result = invoke([*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_summarize_from_a_saved_cache(tiny, tmp_path, text_file):
    fresh = run_json(["summarize", text_file, *SMALL, *GEN])
    kv = str(tmp_path / "a.kv")
    saving = run_json(["summarize", text_file, *SMALL, *GEN, "--save-cache", kv])
    loaded = invoke(["summarize", "--load-cache", kv, *GEN, "--json"])  # no settings: they come from the file
    assert loaded.exit_code == 0, loaded.output
    doc = json.loads(loaded.stdout)
    assert saving["answer"] == fresh["answer"] == doc["answer"]
    assert doc["retention"] == fresh["retention"]
    assert doc["record"]["input_sha256"] == fresh["record"]["input_sha256"]
    assert doc["record"]["input"]["cache_file"] == kv and doc["record"]["input"]["sources"] == [text_file]
    assert doc["record"]["settings"] == fresh["record"]["settings"]
    assert doc["stats"]["tokens"] == fresh["stats"]["tokens"] and doc["stats"]["loaded_from"] == kv
    text = invoke(["summarize", "--load-cache", kv, *GEN])
    assert text.stdout == fresh["answer"] + "\n"
    assert f"loaded {len(TEXT):,} input tokens from {kv}" in " ".join(text.stderr.split())  # rich wraps at 80


def test_ask_save_reads_question_agnostic_and_answers_any_question(tiny, tmp_path, text_file):
    kv = str(tmp_path / "a.kv")
    saving = invoke(["ask", text_file, "Who is he?", *SMALL, *GEN, "--save-cache", kv, "--json"])
    assert saving.exit_code == 0, saving.output
    stderr = " ".join(saving.stderr.split())
    assert "note: --save-cache reads the input without pinning the question" in stderr
    assert f"saved the cache to {kv}" in stderr
    for question in ("Who is he?", "What does he want?"):
        fresh = run_json(["ask", text_file, question, *SMALL, *GEN, "--no-question-first"])
        loaded = run_json(["ask", "--load-cache", kv, question, *GEN])
        assert loaded["answer"] == fresh["answer"]
        if question == "Who is he?":
            assert json.loads(saving.stdout)["answer"] == fresh["answer"]
    several = run_json(["ask", "--load-cache", kv, "-q", "Who is he?", "-q", "What does he want?", *GEN])
    alone = run_json(["ask", "--load-cache", kv, "What does he want?", *GEN])
    assert several["answers"][1]["answer"] == alone["answer"]


def test_question_first_file_answers_only_its_question(tiny, tmp_path, text_file):
    kv = str(tmp_path / "a.kv")
    guided = run_json(["ask", text_file, "Who is he?", *SMALL, *GEN, "--question-first", "--save-cache", kv])
    assert guided["retention"]["question_guided"]
    fresh = run_json(["ask", text_file, "Who is he?", *SMALL, *GEN])
    loaded = run_json(["ask", "--load-cache", kv, "Who is he?", *GEN])
    assert loaded["answer"] == fresh["answer"] == guided["answer"] and loaded["retention"] == fresh["retention"]
    refused(["ask", "--load-cache", kv, "What else?"], 2, "only answers that question")


def refused(args, code: int, needle: str) -> None:
    result = invoke(args)
    assert result.exit_code == code, result.output
    assert needle in result.stderr and "Traceback" not in result.output, result.stderr
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_refusals(tiny, tmp_path, text_file):
    kv = str(tmp_path / "a.kv")
    assert invoke(["summarize", text_file, *SMALL, *GEN, "--save-cache", kv]).exit_code == 0
    refused(["ask", "--load-cache", kv, "Q?", "--cache-size", "256"], 2, "--cache-size 192")
    assert invoke(["ask", "--load-cache", kv, "Q?", "--cache-size", "192", *GEN]).exit_code == 0  # agrees
    refused(["ask", text_file, "--load-cache", kv, "Q?"], 2, "give no SOURCE")
    refused(["summarize", text_file, "--load-cache", kv], 2, "give no SOURCE")
    refused(["summarize", "--load-cache", kv, "--save-cache", kv], 2, "together")
    refused(["summarize", "--load-cache", kv, "--checkpoint", str(tmp_path / "c")], 2, "drop --checkpoint")
    refused(["summarize", "--load-cache", str(tmp_path / "none.kv")], 1, "no such file")
    refused(["summarize", text_file, "--save-cache", str(tmp_path / "no" / "a.kv")], 2, "does not exist")
    (tmp_path / "junk.kv").write_bytes(b"\x00" * 100)
    refused(["summarize", "--load-cache", str(tmp_path / "junk.kv")], 1, "not a cascadectl cache file")
    raw = bytearray(open(kv, "rb").read())
    raw[-3] ^= 0xFF
    (tmp_path / "flipped.kv").write_bytes(bytes(raw))
    refused(["summarize", "--load-cache", str(tmp_path / "flipped.kv")], 1, "checksum")


def test_a_checkpoint_is_not_a_saved_cache(tiny, tmp_path, text_file, monkeypatch):
    from tests.cli.test_checkpoint import interrupted

    ckpt = interrupted(tmp_path, ["summarize", text_file, *SMALL, *GEN], monkeypatch)
    refused(["summarize", "--load-cache", ckpt], 2, "is a checkpoint")
    kv = str(tmp_path / "a.kv")
    assert invoke(["summarize", text_file, *SMALL, *GEN, "--save-cache", kv]).exit_code == 0
    refused(["summarize", text_file, *SMALL, *GEN, "--checkpoint", kv, "--resume"], 2, "not a checkpoint")


@pytest.mark.slow  # ~30 s on 2 idle cores (one 2K-token ingest at stride 128); the tiny-model tests cover CI
def test_embedded_model_answers_the_same_from_its_saved_cache(tmp_path):
    """The real model on ~2K tokens of the bundled novel: the loaded cache answers exactly as the ingest did."""
    src = tmp_path / "book.txt"
    src.write_text(BOOK.read_text(encoding="utf-8")[:8000])
    kv = str(tmp_path / "book.kv")
    settings = ["--cache-size", "512", "--stride", "128", "--max-tokens", "6", "--json"]
    saving = invoke(["ask", str(src), "Who is Mr. Bingley?", *settings, "--save-cache", kv])
    assert saving.exit_code == 0, saving.output
    first = json.loads(saving.stdout)
    assert first["stats"]["tokens"] > 1800 and first["answer"].strip()  # far more than 64 + 512 slots
    assert os.path.getsize(kv) < 2 * first["stats"]["kv_cache_bytes"]  # the cache's size, not the input's
    loaded = invoke(["ask", "--load-cache", kv, "Who is Mr. Bingley?", "--max-tokens", "6", "--json"])
    assert loaded.exit_code == 0, loaded.output
    assert json.loads(loaded.stdout)["answer"] == first["answer"]
