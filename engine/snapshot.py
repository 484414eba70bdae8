"""Cache snapshots: the whole state of a KV cache in one safetensors file, written atomically, checked on load.

Used by `--save-cache`/`--load-cache` (reuse an ingest) and by checkpoints (resume an interrupted ingest).
The file is plain safetensors (never pickle), so any safetensors reader can open it:

    tensors      layer.{l}.k, layer.{l}.v     pre-RoPE keys/values [B, Hkv, slots, D] in the model's dtype
                 layer.{l}.score, .index      cascade: EMA scores [B, Hkv, N] fp32, stream index [B, Hkv, S + N]
                 index                        sink: stream index of every slot [S + N]
                 extra.{name}                 the caller's tensors (carried log-probs, question queries, ...)
    __metadata__ cascadectl                   JSON: format, version, model id and hash, dtype, cache settings,
                                              effective sinks, the cache's integer control state, caller's `extra`
                 sha256                       over that JSON string, the tensor table and every tensor byte

The size is that of the cache (sinks + cache slots), not of the input; `full` keeps every token, so its
snapshot grows with the input by nature. Loading refuses, with one line naming what to change, a file that is
missing, not safetensors, truncated, modified, of another format version, or made with another model, dtype or
cache settings; the checks run before any tensor reaches the model's device."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, fields
from typing import Any, BinaryIO, Callable, NamedTuple

import torch
from torch import Tensor

from .cache import KVCache, make_cache
from .config import CacheConfig
from .errors import CascadeError, ConfigError
from .runner import cache_shape

FORMAT = "cascadectl.kv-cache"
VERSION = 1
MAX_HEADER_BYTES = 16 << 20  # a real header is a few KB; refuse to parse absurd lengths from damaged files

_DTYPES = {  # safetensors dtype names
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}
_FROM_NAME = {name: dtype for dtype, name in _DTYPES.items()}
class Snapshot(NamedTuple):
    cache: KVCache  # on the model's device, ready for Runner.cache
    meta: dict  # the whole metadata: "settings", "n_sinks", "extra" (the caller's), "model", ...
    extra_tensors: dict[str, Tensor]  # on the CPU


# settings added to CacheConfig after files were written: a file without one was made with this value
_ADDED_SETTINGS = {"scores": "exact"}


def config_of(meta: dict) -> CacheConfig:
    """The CacheConfig a snapshot was made with."""
    return CacheConfig(**(_ADDED_SETTINGS | meta["settings"]))


# ------------------------------------------------------------------------------------------------------- saving


def save_snapshot(path: str, cache: KVCache, model, config: CacheConfig, meta: dict | None = None,
                  extra_tensors: dict[str, Tensor] | None = None) -> int:
    """Write `cache` (between chunks) with `meta` (JSON-able) and `extra_tensors` to `path`; returns its size.

    `model` is the engine.models.LoadedModel the cache belongs to. The write is atomic: a temporary file in the
    same directory, fsync, rename; on any failure (a full disk, Ctrl-C) the temporary is removed and an existing
    file at `path` is left as it was."""
    assert cache.n_new == 0, "snapshot taken in the middle of a chunk"
    control, tensors = _cache_state(cache)
    for name, t in (extra_tensors or {}).items():
        tensors[f"extra.{name}"] = t
    header_meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"id": model.model_id, "hash": model.model_hash},
        "dtype": _dtype_name(cache.shape.dtype),
        "settings": asdict(config),
        "n_sinks": cache.n_sinks,
        "cache": control,
        "extra": meta or {},
    }
    meta_json = json.dumps(header_meta, sort_keys=True)
    blobs = {name: _as_bytes(t) for name, t in sorted(tensors.items())}  # CPU copies, one per tensor
    table, offset = {}, 0
    for name, t in sorted(tensors.items()):
        n = len(blobs[name])
        table[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    digest = _digest(meta_json, table, blobs.values())
    header = json.dumps({"__metadata__": {"cascadectl": meta_json, "sha256": digest}, **table},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes

    def write(f: BinaryIO) -> None:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for blob in blobs.values():
            f.write(blob)

    write_atomic(path, write)
    return 8 + len(header) + offset


def write_atomic(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a temporary file next to `path`, fsync it and rename it onto `path`.

    OSError (missing directory, full disk, permissions) becomes a CascadeError naming the path; any failure,
    KeyboardInterrupt included, removes the temporary file first."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CascadeError(f"cannot write {path}: the directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise CascadeError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # an ordinary file's permissions, not mkstemp's private 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise CascadeError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows it
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _cache_state(cache: KVCache) -> tuple[dict, dict[str, Tensor]]:
    """(integer control state, tensors) of any policy's cache: the cache's own `state()`, with what every
    policy shares."""
    control, tensors = cache.export_state()
    return {"policy": cache.policy, "seen": cache.seen, "batch": cache.shape.batch, **control}, tensors


def _as_bytes(t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(meta_json: str, table: dict, blobs) -> str:
    h = _Digest(meta_json, table)
    for blob in blobs:
        h.update(blob)
    return h.hexdigest()


class _Digest:
    """sha256 over the metadata JSON, the tensor table (names, dtypes, shapes, offsets) and the tensor bytes."""

    def __init__(self, meta_json: str, table: dict):
        self.h = hashlib.sha256()
        self.h.update(meta_json.encode())
        self.h.update(b"\0" + json.dumps(table, sort_keys=True, separators=(",", ":")).encode() + b"\0")

    def update(self, data) -> None:
        self.h.update(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------------ loading


def load_snapshot(path: str, model, expected: dict | None = None,
                  inspect: Callable[[dict], None] | None = None) -> Snapshot:
    """Read and check a snapshot for `model` (LoadedModel) and rebuild its cache on the model's device.

    `expected` maps CacheConfig field names to the values this run needs (only the keys given are checked;
    leave out what may come from the file). `inspect(meta)`, the caller's own checks (what kind of file, for
    which command), runs after the integrity and model checks and before the settings are compared. Raises
    CascadeError (file problems) or ConfigError (the file was made with another model, dtype or settings),
    always with one line."""
    meta, table, tensors = read_snapshot(path)
    _check_model(path, meta, model)
    if inspect is not None:
        inspect(meta)
    _check_settings(path, meta, expected or {})
    try:
        cache = _rebuild(meta, tensors, model)
    except (_Unusable, KeyError, TypeError, ValueError, RuntimeError) as e:  # a well-signed but odd file
        raise CascadeError(f"{path} is not a usable cascadectl cache file ({_short(e)})") from None
    extra = {name.removeprefix("extra."): t for name, t in tensors.items() if name.startswith("extra.")}
    return Snapshot(cache, meta, extra)


def read_snapshot(path: str) -> tuple[dict, dict, dict[str, Tensor]]:
    """(metadata, tensor table, CPU tensors) of a snapshot file, after every integrity check."""
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except FileNotFoundError:
        raise CascadeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CascadeError(f"{path} is a directory, not a cache file") from None
    except OSError as e:
        raise CascadeError(f"cannot read {path}: {e.strerror or e}") from None
    not_ours = f"{path} is not a cascadectl cache file"
    with f:
        try:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > MAX_HEADER_BYTES:
                raise CascadeError(f"{not_ours} (no safetensors header)")
            raw = f.read(n)
            if len(raw) < n:
                raise CascadeError(f"{path} is truncated (its header is cut short)")
            header = _parse_header(raw, not_ours)
            signature = header.pop("__metadata__")
            meta_json = signature["cascadectl"]
            meta = _parse_meta(meta_json, path, not_ours)
            table = _check_table(header, size - 8 - n, path, not_ours)
            digest = _Digest(meta_json, table)
            tensors = {}
            for name, entry in sorted(table.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                a, b = entry["data_offsets"]
                buf = bytearray(b - a)
                if f.readinto(buf) != b - a:
                    raise CascadeError(f"{path} is truncated")
                digest.update(buf)
                dtype = _FROM_NAME[entry["dtype"]]
                shape = entry["shape"]
                tensors[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)
        except OSError as e:
            raise CascadeError(f"cannot read {path}: {e.strerror or e}") from None
    if signature.get("sha256") != digest.hexdigest():
        raise CascadeError(f"{path} is damaged or was modified (checksum mismatch); save it again")
    return meta, table, tensors


def _parse_header(raw: bytes, not_ours: str) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise CascadeError(f"{not_ours} (its header is not JSON)") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise CascadeError(f"{not_ours} (no metadata)")
    if not isinstance(header["__metadata__"].get("cascadectl"), str):
        raise CascadeError(f"{not_ours} (a safetensors file, but not one cascadectl wrote)")
    return header


def _parse_meta(meta_json: str, path: str, not_ours: str) -> dict:
    try:
        meta = json.loads(meta_json)
    except (ValueError, RecursionError):
        raise CascadeError(f"{not_ours} (unreadable metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CascadeError(f"{not_ours} (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise CascadeError(f"{path} has cache file format version {meta.get('version')!r}; this cascadectl reads "
                           f"version {VERSION}: save it again with this version")
    return meta


def _check_table(header: dict, data_len: int, path: str, not_ours: str) -> dict:
    """Tensor entries well formed, contiguous from 0 and covering exactly the bytes after the header."""
    spans = []
    for name, entry in header.items():
        ok = (isinstance(entry, dict) and entry.get("dtype") in _FROM_NAME and isinstance(entry.get("shape"), list)
              and all(type(d) is int and d >= 0 for d in entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(type(o) is int and o >= 0 for o in entry["data_offsets"]))
        if not ok:
            raise CascadeError(f"{not_ours} (bad entry for tensor {name[:40]!r})")
        a, b = entry["data_offsets"]
        itemsize = torch.empty(0, dtype=_FROM_NAME[entry["dtype"]]).element_size()
        if b - a != math.prod(entry["shape"]) * itemsize:
            raise CascadeError(f"{not_ours} (tensor {name[:40]!r} has the wrong length)")
        spans.append((a, b))
    spans.sort()
    end = 0
    for a, b in spans:
        if a != end:
            raise CascadeError(f"{not_ours} (tensor data overlaps or has gaps)")
        end = b
    if end > data_len:
        raise CascadeError(f"{path} is truncated ({data_len:,} of {end:,} data bytes)")
    if end < data_len:
        raise CascadeError(f"{path} has {data_len - end:,} unexpected bytes after its data")
    return header


def _check_model(path: str, meta: dict, model) -> None:
    """The file was made for this model and dtype."""
    made = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    if made.get("hash") != model.model_hash:
        raise ConfigError(f"{path} was made with model {made.get('id')!r} (hash {str(made.get('hash'))[:12]}), "
                          f"not {model.model_id!r} ({model.model_hash[:12]}); pass `model` for that model")
    dtype = _dtype_name(model.dtype)
    if not isinstance(meta.get("dtype"), str):
        raise CascadeError(f"{path} is not a usable cascadectl cache file (bad dtype)")
    if meta.get("dtype") != dtype:
        raise ConfigError(f"{path} was made with `dtype={_flag_dtype(meta.get('dtype'))}`, not "
                          f"{_flag_dtype(dtype)}; pass `dtype={_flag_dtype(meta.get('dtype'))}`")


def _check_settings(path: str, meta: dict, expected: dict) -> None:
    """Well-formed cache settings, equal to `expected` where it says."""
    settings = meta.get("settings")
    if isinstance(settings, dict):
        settings = _ADDED_SETTINGS | settings
    names = {f.name for f in fields(CacheConfig)}
    try:
        _require(isinstance(settings, dict) and set(settings) == names, "settings")
        for f in fields(CacheConfig):  # each of its declared type (CacheConfig skips some checks for `full`)
            value, want = settings[f.name], type(f.default)
            _require(type(value) is want or (want is float and type(value) is int), f.name)
        CacheConfig(**settings)
    except (_Unusable, CascadeError, TypeError):
        raise CascadeError(f"{path} is not a usable cascadectl cache file (bad cache settings)") from None
    for name, want in expected.items():
        if name in names and settings[name] != want:
            raise ConfigError(f"{path} was made with `{name}={settings[name]}`, not {want}; pass "
                              f"`{name}={settings[name]}`", setting=name)


def _flag_dtype(name) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(name, str(name))


class _Unusable(Exception):
    """A well-signed file whose contents cannot be a cache (crafted, or written by a buggy version); the loader
    turns it into the one-line CascadeError. Explicit checks, not `assert`: `python -O` strips those."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise _Unusable(what)


def _is_int(x: Any) -> bool:
    return type(x) is int  # not bool, not float


def _rebuild(meta: dict, tensors: dict[str, Tensor], model) -> KVCache:
    """A fresh cache of the file's policy on the model's device, filled with the file's state."""
    config = config_of(meta)
    control, n_sinks = meta["cache"], meta["n_sinks"]
    _require(isinstance(control, dict), "control state")
    seen, batch = control["seen"], control["batch"]
    _require(all(_is_int(x) for x in (n_sinks, seen, batch)) and n_sinks >= 0 and seen >= 0 and batch >= 1,
             "sinks, seen or batch")
    _require(control["policy"] == config.policy, "policy and control state disagree")
    shape = cache_shape(model.model, batch)  # per-layer devices when the model is spread over several
    capacity = control.get("capacity", 0)  # the dense cache's buffer: allocated before it is filled
    _require(_is_int(capacity) and 0 <= capacity <= max(model.max_positions, 4096, seen), "capacity")
    cache = make_cache(config, shape, n_sinks, expected_tokens=capacity)
    cache.seen = seen
    cache.import_state(control, tensors)  # ValueError for what does not fit: the caller's one-line error
    return cache


def _short(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:120]
