"""`--model ollama:NAME[:TAG]`: the GGUF blob of a model in ollama's local store, found without ollama running.

The store is `$OLLAMA_MODELS`, default `~/.ollama/models`. A pulled model is a manifest at
`manifests/<host>/<namespace>/<name>/<tag>` (JSON; `layers[]` of `{mediaType, digest, size}`) whose layer of
media type `application/vnd.ollama.image.model` is the GGUF, stored content-addressed as `blobs/sha256-<hex>`.
`NAME` may be `name` (host registry.ollama.ai, namespace library), `namespace/name` or `host/namespace/name`;
the tag defaults to `latest`. Nothing here touches the network.

Everything read from the store is checked: each part of the name and the digest must match a strict pattern
(no path separators, no `..`), the manifest must be a small JSON file, and the manifest and the blob must be
regular files whose real paths stay inside the store (a symlink out of it is refused). Errors list the models
found locally."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import ModelFileError, ModelNotFoundError

PREFIX = "ollama:"
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
MAX_MANIFEST = 1 << 20  # real manifests are under 2 KiB
MAX_LISTED = 200  # names walked for an error message

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a host (registry.ollama.ai), namespace or name
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}(:[0-9]{1,5})?")  # with a port, as ollama allows
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def is_ollama_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def store_root() -> Path:
    """`$OLLAMA_MODELS`, default `~/.ollama/models`."""
    return Path(os.environ.get("OLLAMA_MODELS") or "~/.ollama/models").expanduser()


def parse_name(spec: str) -> tuple[str, str, str, str]:
    """`ollama:[[host/]namespace/]name[:tag]` -> (host, namespace, name, tag). Raises ModelNotFoundError."""
    text = spec[len(PREFIX):] if is_ollama_spec(spec) else spec
    path, _, tag = text.rpartition(":") if ":" in text.rsplit("/", 1)[-1] else (text, "", DEFAULT_TAG)
    parts = path.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_HOST, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_HOST, *parts]
    host_ok = len(parts) == 3 and _HOST.fullmatch(parts[0]) is not None
    if not (host_ok and all(_PART.fullmatch(p) and ".." not in p for p in parts[1:])
            and _TAG.fullmatch(tag) and ".." not in parts[0]):
        raise ModelNotFoundError(
            f"--model {spec!r} is not an ollama model name; use ollama:NAME[:TAG], ollama:NAMESPACE/NAME[:TAG] "
            f"or ollama:HOST/NAMESPACE/NAME[:TAG] (letters, digits, '.', '_', '-')"
        )
    host, namespace, name = parts
    return host, namespace, name, tag


def short_name(host: str, namespace: str, name: str, tag: str) -> str:
    """The name as `ollama list` shows it: registry.ollama.ai/library/ left out."""
    if host == DEFAULT_HOST:
        return f"{name}:{tag}" if namespace == DEFAULT_NAMESPACE else f"{namespace}/{name}:{tag}"
    return f"{host}/{namespace}/{name}:{tag}"


def local_names(root: Path | None = None) -> list[str]:
    """Models in the store's manifests (at most MAX_LISTED, sorted), as `ollama list` names them; symlinks are not
    followed."""
    root = store_root() if root is None else root
    found: list[str] = []
    manifests = root / "manifests"
    try:
        for host in sorted(os.scandir(manifests), key=lambda e: e.name):
            for namespace in _dirs(host):
                for name in _dirs(namespace):
                    for tag in sorted(os.scandir(name.path), key=lambda e: e.name):
                        if tag.is_file(follow_symlinks=False):
                            found.append(short_name(host.name, namespace.name, name.name, tag.name))
                        if len(found) >= MAX_LISTED:
                            return sorted(found)
    except OSError:
        pass
    return sorted(found)


def _dirs(entry: os.DirEntry) -> list[os.DirEntry]:
    if not entry.is_dir(follow_symlinks=False):
        return []
    return sorted((e for e in os.scandir(entry.path) if e.is_dir(follow_symlinks=False)), key=lambda e: e.name)


def _available(root: Path) -> str:
    names = local_names(root)
    if not names:
        return f"no models found in {root} (set OLLAMA_MODELS to ollama's models folder, or `ollama pull` one)"
    more = " ..." if len(names) >= MAX_LISTED else ""
    return f"models in {root}: {', '.join(names)}{more}"


def _inside(path: Path, root: Path, what: str, spec: str) -> Path:
    """`path` resolved; refuses one whose real location is outside `root`, or that is not a regular file."""
    real = path.resolve()
    if not real.is_relative_to(root):
        raise ModelFileError(f"--model {spec!r}: the {what} {path} points outside the ollama store {root} "
                             f"(to {real}); refused")
    if not real.is_file():
        raise ModelFileError(f"--model {spec!r}: the {what} {path} is not a regular file")
    return real


def find_blob(spec: str) -> tuple[Path, str]:
    """(path of the GGUF blob, the ollama name as `ollama list` writes it) for an `ollama:` spec.

    Raises ModelNotFoundError (no such model; lists the local ones) or ModelFileError (a damaged or crafted
    manifest, a missing blob, a path leaving the store)."""
    host, namespace, name, tag = parse_name(spec)
    shown = short_name(host, namespace, name, tag)
    configured = store_root()
    if not configured.is_dir():
        raise ModelNotFoundError(f"--model {spec!r}: no ollama store at {configured} (set OLLAMA_MODELS to the "
                                 f"folder that holds ollama's manifests/ and blobs/)")
    root = configured.resolve()
    manifest = root / "manifests" / host / namespace / name / tag
    if not os.path.lexists(manifest):
        raise ModelNotFoundError(f"--model {spec!r}: {shown} is not in the ollama store; {_available(root)}")
    manifest = _inside(manifest, root, "manifest", spec)
    try:
        with open(manifest, "rb") as f:
            raw = f.read(MAX_MANIFEST + 1)
    except OSError as e:
        raise ModelFileError(f"--model {spec!r}: cannot read the manifest {manifest}: {e.strerror or e}") from None
    if len(raw) > MAX_MANIFEST:
        raise ModelFileError(f"--model {spec!r}: the manifest {manifest} is larger than {MAX_MANIFEST} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ModelFileError(f"--model {spec!r}: the manifest {manifest} is not JSON") from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise ModelFileError(f"--model {spec!r}: the manifest {manifest} has no layers list")
    models = [layer for layer in layers if isinstance(layer, dict) and layer.get("mediaType") == MODEL_MEDIA_TYPE]
    if len(models) != 1:
        raise ModelFileError(f"--model {spec!r}: the manifest {manifest} has {len(models)} model layers "
                             f"({MODEL_MEDIA_TYPE}), not one; is {shown} an embedding-only or adapter entry?")
    digest = models[0].get("digest")
    match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise ModelFileError(f"--model {spec!r}: the manifest {manifest} names the model blob {str(digest)[:80]!r}, "
                             f"not sha256:<64 hex digits>")
    blob = root / "blobs" / f"sha256-{match.group(1)}"
    if not os.path.lexists(blob):
        raise ModelFileError(f"--model {spec!r}: the blob {blob} of {shown} is missing (a partial pull? run "
                             f"`ollama pull {shown}` again)")
    blob = _inside(blob, root, "blob", spec)
    size = models[0].get("size")
    if isinstance(size, int) and not isinstance(size, bool) and blob.stat().st_size != size:
        raise ModelFileError(f"--model {spec!r}: the blob {blob} has {blob.stat().st_size} bytes, the manifest "
                             f"says {size} (a partial pull? run `ollama pull {shown}` again)")
    return blob, shown
