"""`--model FILE.gguf` and `--model ollama:NAME` through the real CLI: the same numbers as the same weights in a
safetensors folder, the embedded GGUF given by path gives exactly the default's numbers, and hostile files or
store entries end in one `error:` line and exit 1, never a traceback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cascadectl.main import app
from engine.models import find_embedded_gguf
from tests.cli.test_bad_inputs import EXIT_FAILURE
from tests.engine.gguf_files import write_gguf
from tests.engine.test_ollama import add_model
from tests.engine.tiny import tiny_model

TEXT = "The harbour committee met on Tuesday and agreed the budget for the repairs of the old pier. " * 12
SETTINGS = ["--cache-size", "64", "--stride", "32", "--sinks", "4", "--cascades", "4"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CASCADECTL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def ppl(text: Path, model: str, *extra: str) -> dict:
    result = CliRunner().invoke(app, ["ppl", str(text), *SETTINGS, "--json", "--model", model, *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_ppl_of_a_gguf_equals_the_same_weights_in_safetensors(tmp_path, home, text, family):
    model = tiny_model(family, seed=7, max_positions=2048)
    path = write_gguf(model, tmp_path / f"{family}.gguf")
    from_gguf = ppl(text, str(path), "--policy", "full")
    cache = next(p for p in (home / "models").iterdir() if p.is_dir())
    folder = tmp_path / "dir"
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(cache / name, folder / name)
    from_dir = ppl(text, str(folder), "--policy", "full")
    a, b = from_gguf["results"][0], from_dir["results"][0]
    assert a["tokens"] == b["tokens"] == len(TEXT.encode())  # one token per byte: the GGUF's byte vocabulary
    assert np.isclose(a["nll_per_token"], b["nll_per_token"], rtol=0, atol=1e-5)
    assert from_gguf["model"]["id"] == str(path) and len(from_gguf["model"]["hash"]) == 64


def test_ask_through_an_ollama_name(tmp_path, home, text, monkeypatch):
    store = tmp_path / "ollama"
    add_model(store, write_gguf(tiny_model("qwen2", seed=8), tmp_path / "m.gguf").read_bytes(), name="tiny")
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    result = CliRunner().invoke(app, ["ask", str(text), "What was agreed?", *SETTINGS, "--max-tokens", "3",
                                      "--evidence", "0", "--json", "--model", "ollama:tiny"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["record"]["model_id"] == "ollama:tiny" and len(doc["record"]["model_hash"]) == 64


def test_embedded_gguf_by_path_gives_exactly_the_default_numbers(text):
    """The default and `--model <the embedded GGUF>` are one file, one hash and one cache: identical numbers."""
    default = ppl_embedded(text)
    by_path = ppl_embedded(text, "--model", str(find_embedded_gguf()))
    assert by_path["model"]["hash"] == default["model"]["hash"]
    assert by_path["model"]["id"] == str(find_embedded_gguf())
    for a, b in zip(default["results"], by_path["results"]):
        assert a["ppl"] == b["ppl"] and a["nll_per_token"] == b["nll_per_token"] and a["tokens"] == b["tokens"]


def ppl_embedded(text: Path, *extra: str) -> dict:
    result = CliRunner().invoke(app, ["ppl", str(text), "--cache-size", "64", "--stride", "64", "--json",
                                      "--dtype", "fp32", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- hostile files and store entries, one line each ----------------------------------------------------------


def _truncated(tmp_path: Path) -> tuple[str, str]:
    whole = write_gguf(tiny_model("llama"), tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) // 2])
    return str(tmp_path / "cut.gguf"), "ends past the end of the file"


def _q8_k(tmp_path: Path) -> tuple[str, str]:
    blocks = np.zeros((4, 292), dtype=np.uint8)
    path = write_gguf(tiny_model("llama"), tmp_path / "q8k.gguf", extra={"blk.0.extra.weight": (blocks, "Q8_K")})
    return str(path), "holds Q8_K tensors, which transformers cannot de-quantize"


def _shapes(tmp_path: Path) -> tuple[str, str]:
    path = write_gguf(tiny_model("qwen2"), tmp_path / "shapes.gguf", lie={"attention.head_count_kv": 3})
    return str(path), "its tensor shapes do not match the model its metadata describes"


def _lying_size(tmp_path: Path) -> tuple[str, str]:
    path = write_gguf(tiny_model("llama"), tmp_path / "big.gguf", lie={"embedding_length": 61440})
    return str(path), "its metadata describes a"


def _ollama_missing_blob(tmp_path: Path) -> tuple[str, str]:
    add_model(tmp_path / "ollama", b"GGUF" + bytes(100), name="gone")
    shutil.rmtree(tmp_path / "ollama" / "blobs")
    return "ollama:gone", "is missing"


def _ollama_escape(tmp_path: Path) -> tuple[str, str]:
    manifest = add_model(tmp_path / "ollama", b"GGUF" + bytes(100), name="evil")
    doc = json.loads(manifest.read_text())
    doc["layers"][0]["digest"] = "sha256:../../../../etc/passwd"
    manifest.write_text(json.dumps(doc))
    return "ollama:evil", "not sha256:<64 hex digits>"


def _ollama_unknown(tmp_path: Path) -> tuple[str, str]:
    add_model(tmp_path / "ollama", b"GGUF" + bytes(100), name="present", tag="1b")
    return "ollama:absent", "models in"


def assert_one_error_line(result, message: str) -> None:
    """Exit 1, nothing on stdout, no traceback, one `error:` line on stderr; a failure that comes half-way
    through a conversion follows that conversion's one progress line (`converting ...`), nothing else."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.exit_code == EXIT_FAILURE, output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    if len(lines) == 2 and lines[0].startswith("converting "):
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


CASES = {"truncated": _truncated, "q8_k": _q8_k, "shapes": _shapes, "lying size": _lying_size,
         "ollama missing blob": _ollama_missing_blob, "ollama escape": _ollama_escape,
         "ollama unknown": _ollama_unknown}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_model_is_one_line(tmp_path, home, text, monkeypatch, case):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    spec, message = CASES[case](tmp_path)
    result = CliRunner().invoke(app, ["ppl", str(text), *SETTINGS, "--model", spec])
    assert_one_error_line(result, message)
    assert not [p for p in home.glob("models/*") if p.is_dir()]  # nothing half-converted left behind
