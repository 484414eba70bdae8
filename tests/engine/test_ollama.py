"""`--model ollama:NAME[:TAG]` on a fake ollama store built in a temporary folder: the manifest leads to the GGUF
blob, which loads like the same file given directly; a crafted manifest (path separators in the digest, a missing
blob, a symlink out of the store) is refused in one line; a missing name lists the local ones."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from engine import models, ollama
from engine.errors import ModelFileError, ModelNotFoundError
from tests.engine.gguf_files import write_gguf
from tests.engine.tiny import tiny_model


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    return write_gguf(tiny_model("qwen2", seed=5), tmp_path_factory.mktemp("src") / "m.gguf").read_bytes()


def add_model(root: Path, data: bytes, name: str = "tiny", tag: str = "latest", host: str = "registry.ollama.ai",
              namespace: str = "library", layers: list | None = None) -> Path:
    """Lay `data` out as `ollama pull` does: a blob named by its digest and a manifest pointing at it."""
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / f"sha256-{digest}").write_bytes(data)
    config = b'{"model_format":"gguf"}'
    (root / "blobs" / f"sha256-{hashlib.sha256(config).hexdigest()}").write_bytes(config)
    if layers is None:
        layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(data)},
                  {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 9}]
    manifest = root / "manifests" / host / namespace / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": f"sha256:{hashlib.sha256(config).hexdigest()}", "size": len(config)},
        "layers": layers}))
    return manifest


@pytest.fixture
def store(tmp_path, monkeypatch, gguf_bytes) -> Path:
    root = tmp_path / "ollama" / "models"
    add_model(root, gguf_bytes)
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    monkeypatch.setenv("CASCADECTL_HOME", str(tmp_path / "home"))
    return root


def test_name_forms():
    assert ollama.parse_name("ollama:llama3.2") == ("registry.ollama.ai", "library", "llama3.2", "latest")
    assert ollama.parse_name("ollama:qwen2.5:0.5b-instruct-q4_K_M") == (
        "registry.ollama.ai", "library", "qwen2.5", "0.5b-instruct-q4_K_M")
    assert ollama.parse_name("ollama:someone/model:v1") == ("registry.ollama.ai", "someone", "model", "v1")
    assert ollama.parse_name("ollama:hf.co/org/Model-GGUF:Q4_K_M") == ("hf.co", "org", "Model-GGUF", "Q4_K_M")
    assert ollama.parse_name("ollama:localhost:5000/ns/m") == ("localhost:5000", "ns", "m", "latest")


@pytest.mark.parametrize("spec", ["ollama:", "ollama:../../etc/passwd", "ollama:a/../b", "ollama:x:..",
                                  "ollama:a/b/c/d", "ollama:name:", "ollama:/abs", "ollama:a b", "ollama:..:latest",
                                  "ollama:ns/..:x", "ollama:x:a/b"])
def test_bad_names_are_refused_before_touching_the_store(spec, monkeypatch, tmp_path):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-store"))
    with pytest.raises(ModelNotFoundError, match="not an ollama model name"):
        ollama.find_blob(spec)


def test_ollama_model_loads_like_the_file_itself(store, tmp_path, gguf_bytes):
    lm = models.load_model("ollama:tiny", device="cpu", dtype="fp32")
    direct = tmp_path / "direct.gguf"
    direct.write_bytes(gguf_bytes)
    same = models.load_model(str(direct), device="cpu", dtype="fp32")
    assert lm.family == "qwen2" and lm.model_id == "ollama:tiny"
    assert lm.model_hash == same.model_hash == hashlib.sha256(gguf_bytes).hexdigest()
    assert Path(lm.model.config.name_or_path).name == f"ollama-tiny-latest-{lm.model_hash[:12]}"
    x = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lm.model(x).logits, same.model(x).logits)
    assert models.load_model("ollama:tiny:latest", device="cpu", dtype="fp32").model_hash == lm.model_hash


def test_namespaced_and_hosted_names(store, gguf_bytes):
    add_model(store, gguf_bytes, name="m", tag="v1", namespace="someone")
    add_model(store, gguf_bytes, name="Model-GGUF", tag="Q8_0", host="hf.co", namespace="org")
    assert ollama.find_blob("ollama:someone/m:v1") == (store / "blobs" / f"sha256-{hashlib.sha256(gguf_bytes).hexdigest()}",
                                                       "someone/m:v1")
    blob, shown = ollama.find_blob("ollama:hf.co/org/Model-GGUF:Q8_0")
    assert shown == "hf.co/org/Model-GGUF:Q8_0" and blob.is_file()


def test_missing_name_lists_the_local_ones(store, gguf_bytes):
    add_model(store, gguf_bytes, name="other", tag="7b")
    add_model(store, gguf_bytes, name="m", tag="v1", namespace="someone")
    with pytest.raises(ModelNotFoundError) as e:
        ollama.find_blob("ollama:llama3.2")
    message = str(e.value)
    assert "llama3.2:latest is not in the ollama store" in message
    assert "other:7b, someone/m:v1, tiny:latest" in message and "\n" not in message
    with pytest.raises(ModelNotFoundError, match="tiny:latest"):
        ollama.find_blob("ollama:tiny:8b")


def test_empty_and_missing_stores(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="no models found in"):
        ollama.find_blob("ollama:tiny")
    monkeypatch.delenv("OLLAMA_MODELS")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ModelNotFoundError, match=r"no ollama store at .*home/\.ollama/models .*OLLAMA_MODELS"):
        models.load_model("ollama:tiny", device="cpu")


def _manifest(store: Path) -> Path:
    return store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"


def _set_digest(store: Path, digest) -> None:
    path = _manifest(store)
    doc = json.loads(path.read_text())
    doc["layers"][0]["digest"] = digest
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("digest", ["sha256:../../../etc/passwd", "sha256:" + "a" * 63 + "/", "sha256/../x",
                                    "md5:" + "a" * 32, "sha256:" + "A" * 64, 42, None, "sha256:" + "a" * 64 + "\n"])
def test_digest_that_is_no_sha256_is_refused(store, digest):
    _set_digest(store, digest)
    with pytest.raises(ModelFileError, match="not sha256:<64 hex digits>"):
        ollama.find_blob("ollama:tiny")


def test_missing_blob(store):
    _set_digest(store, "sha256:" + "b" * 64)
    with pytest.raises(ModelFileError, match="is missing .*ollama pull tiny:latest"):
        models.load_model("ollama:tiny", device="cpu")


def test_blob_cut_short_is_refused_by_its_size(store, gguf_bytes):
    blob, _ = ollama.find_blob("ollama:tiny")
    blob.write_bytes(gguf_bytes[:1000])
    with pytest.raises(ModelFileError, match=f"has 1000 bytes, the manifest says {len(gguf_bytes)}"):
        ollama.find_blob("ollama:tiny")


def test_blob_symlink_out_of_the_store(store, tmp_path, gguf_bytes):
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(gguf_bytes)
    blob, _ = ollama.find_blob("ollama:tiny")
    blob.unlink()
    blob.symlink_to(outside)
    with pytest.raises(ModelFileError, match="points outside the ollama store"):
        models.load_model("ollama:tiny", device="cpu")


def test_manifest_symlink_out_of_the_store(store, tmp_path):
    outside = tmp_path / "manifest.json"
    outside.write_text(_manifest(store).read_text())
    _manifest(store).unlink()
    _manifest(store).symlink_to(outside)
    with pytest.raises(ModelFileError, match="manifest .* points outside the ollama store"):
        ollama.find_blob("ollama:tiny")


def test_symlinks_inside_the_store_are_followed(store):
    """A blob linked to another blob of the same store (a deduplicating copy) stays inside it: allowed."""
    blob, _ = ollama.find_blob("ollama:tiny")
    copy = blob.with_name("copy")
    blob.rename(copy)
    blob.symlink_to(copy)
    assert ollama.find_blob("ollama:tiny")[0] == copy.resolve()


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe not json", "is not JSON"),
    (b"[1, 2]", "no layers list"),
    (b'{"layers": {"a": 1}}', "no layers list"),
    (b'{"layers": []}', "has 0 model layers"),
    (b"[" * 100000 + b"]" * 100000, "is not JSON"),
    (b'{"layers": [' + b'{"mediaType": "application/vnd.ollama.image.model", "digest": "x"},' * 2 + b'{}]}',
     "has 2 model layers"),
    (b" " * (2 << 20), "larger than"),
])
def test_damaged_manifest(store, content, message):
    _manifest(store).write_bytes(content)
    with pytest.raises(ModelFileError, match=message) as e:
        ollama.find_blob("ollama:tiny")
    assert "\n" not in str(e.value)


def test_manifest_that_is_a_directory(store):
    path = _manifest(store)
    path.unlink()
    path.mkdir()
    with pytest.raises(ModelFileError, match="is not a regular file"):
        ollama.find_blob("ollama:tiny")


def test_blob_that_is_no_gguf(store):
    blob, _ = ollama.find_blob("ollama:tiny")
    data = b"PK\x03\x04" + bytes(blob.stat().st_size - 4)  # same size as the manifest says, wrong content
    blob.write_bytes(data)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        models.load_model("ollama:tiny", device="cpu")
