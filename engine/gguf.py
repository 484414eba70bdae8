"""GGUF files: a bounded check of the header before any other parser reads the file, and what it tells us.

`read_header` walks the header of a GGUF (v2 or v3, the only ones llama.cpp has written since 2023) with every
count and length checked against the file's size before it is used, so a truncated or crafted file costs at most
one pass over its header and raises `ModelFileError` (one line) instead of sending gguf-py or transformers into a
huge allocation, an endless loop or a traceback. Checked: the magic, the version, the tensor and key-value counts
(each record takes a minimum number of bytes, so the counts are bounded by the file size), every string length,
array lengths and nesting, value and tensor types, tensor names (unique, at most 64 bytes as ggml allows),
dimensions (1 to 4, none zero, whole quantization blocks) and that every tensor's data lies inside the file,
aligned, without overlapping another.

Metadata values are kept except long arrays (a vocabulary, its merges), which stay `GgufSkipped(type, count)`
summaries, as are strings over 1 MiB: nothing here needs their content. `unreadable_types` names the tensor types transformers cannot
de-quantize (it reads GGUF weights through gguf-py's `dequantize`; asked per type, not listed here)."""
from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .errors import ModelFileError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: ggml refuses longer tensor names
MAX_KEY = 65535  # the spec's bound on metadata key length
MAX_NESTING = 2  # an array of arrays at most; no file in the wild nests deeper
KEEP_STRING = 1 << 20  # longer string values (none in real files: a chat template is a few KiB) are not copied
KEEP_ARRAY = 256  # numeric arrays up to this length are kept (per-layer head counts); longer ones are summarised
DEFAULT_ALIGNMENT = 32
_HEAD = 24  # magic, version, tensor count, kv count
_MIN_KV = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR = 8 + 4 + 8 + 4 + 8  # name length, dim count, one dim, type, offset

# value type id -> (struct format, size) of the fixed-size ones; 8 is a string, 9 an array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9


class GgufSkipped(NamedTuple):
    """A metadata value walked but not kept: a long array (its element type id and length) or a string longer
    than KEEP_STRING (type 8 and its length in bytes)."""

    value_type: int
    count: int


class GgufTensor(NamedTuple):
    name: str
    dims: tuple[int, ...]  # ggml order: fastest-moving first
    type_name: str  # F32, Q4_K, ...
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


@dataclass(frozen=True)
class GgufHeader:
    path: Path
    version: int
    file_size: int
    metadata: dict[str, Any]
    tensors: tuple[GgufTensor, ...]
    data_start: int

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    @property
    def elements(self) -> int:
        """Values stored over all tensors: what the de-quantized weights hold."""
        return sum(t.elements for t in self.tensors)

    @property
    def type_names(self) -> dict[str, int]:
        """Tensor type name -> how many tensors use it."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        return counts


def read_header(path: str | Path) -> GgufHeader:
    """Check and parse the header of the GGUF at `path`; never reads tensor data. Raises ModelFileError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < _HEAD:
                raise ModelFileError(f"{path} is not a GGUF file (only {size} bytes; truncated?)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                return _Parser(path, blob, size).header()
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}") from None


@functools.lru_cache(maxsize=None)
def _readable(type_name: str) -> bool:
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize
    from gguf.constants import GGML_QUANT_SIZES

    qtype = GGMLQuantizationType[type_name]
    try:  # one zero block through the same function transformers calls
        dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def unreadable_types(header: GgufHeader) -> list[str]:
    """Tensor types in the file that transformers cannot de-quantize (e.g. Q8_K, I32, F64)."""
    return sorted(name for name in header.type_names if not _readable(name))


def readable_type_names() -> list[str]:
    """Every tensor type transformers can de-quantize, in gguf's order."""
    from gguf import GGMLQuantizationType

    return [t.name for t in GGMLQuantizationType if _type_size(t.name) and _readable(t.name)]


def cache_dtype(header: GgufHeader) -> str:
    """The dtype the converted safetensors keep: float32 if every tensor is F32, float16 if the weights are F16,
    else bfloat16 (BF16 weights, and any quantized file: de-quantized blocks are kept at half width)."""
    kinds = set(header.type_names)
    if kinds <= {"F32"}:
        return "float32"
    if kinds <= {"F32", "F16"}:
        return "float16"
    return "bfloat16"


@functools.lru_cache(maxsize=None)
def _type_size(type_name: str) -> tuple[int, int] | None:
    from gguf.constants import GGML_QUANT_SIZES

    for qtype, sizes in GGML_QUANT_SIZES.items():
        if qtype.name == type_name:
            return sizes
    return None


@functools.lru_cache(maxsize=1)
def _type_names() -> dict[int, str]:
    from gguf import GGMLQuantizationType

    return {int(t): t.name for t in GGMLQuantizationType}


class _Parser:
    """One pass over a header held as a read-only map; every read checks the bytes it needs are there."""

    def __init__(self, path: Path, blob, size: int) -> None:
        self.path, self.blob, self.size, self.pos = path, blob, size, 0

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path} is not a usable GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file at byte {self.pos} (truncated?)")

    def unpack(self, fmt: str, n: int, what: str):
        self.need(n, what)
        value = struct.unpack_from(fmt, self.blob, self.pos)
        self.pos += n
        return value

    def skip_string(self, what: str) -> int:
        (length,) = self.unpack("<Q", 8, f"the length of {what}")
        self.need(length, f"{what} ({length} bytes)")
        self.pos += length
        return length

    def string(self, what: str, limit: int | None = None) -> str:
        (length,) = self.unpack("<Q", 8, f"the length of {what}")
        if limit is not None and length > limit:
            raise self.fail(f"{what} is {length} bytes long (at most {limit})")
        self.need(length, f"{what} ({length} bytes)")
        raw = self.blob[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, value_type: int, what: str, depth: int = 0) -> Any:
        if value_type in _SCALARS:
            fmt, n = _SCALARS[value_type]
            return self.unpack(fmt, n, what)[0]
        if value_type == _STRING:
            (length,) = struct.unpack_from("<Q", self.blob, self.pos) if self.pos + 8 <= self.size else (0,)
            if length > KEEP_STRING:
                return GgufSkipped(_STRING, self.skip_string(what))
            return self.string(what)
        if value_type != _ARRAY:
            raise self.fail(f"{what} has the unknown value type {value_type}")
        if depth >= MAX_NESTING:
            raise self.fail(f"{what} nests arrays more than {MAX_NESTING} deep")
        element_type, count = self.unpack("<IQ", 12, f"the array header of {what}")
        if element_type in _SCALARS:
            fmt, n = _SCALARS[element_type]
            self.need(count * n, f"{what} ({count} values)")
            if count > KEEP_ARRAY:
                self.pos += count * n
                return GgufSkipped(element_type, count)
            values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.blob, self.pos))
            self.pos += count * n
            return values
        if element_type not in (_STRING, _ARRAY):
            raise self.fail(f"{what} is an array of the unknown value type {element_type}")
        smallest = 8 if element_type == _STRING else 12
        self.need(count * smallest, f"{what} ({count} elements)")  # bounds the loop below by the file size
        for i in range(count):
            if element_type == _STRING:
                self.skip_string(f"element {i} of {what}")
            else:
                self.value(_ARRAY, f"element {i} of {what}", depth + 1)
        return GgufSkipped(element_type, count)

    def header(self) -> GgufHeader:
        if bytes(self.blob[:4]) != MAGIC:
            raise ModelFileError(f"{self.path} is not a GGUF file (it does not start with the GGUF magic)")
        self.pos = 4
        version, tensor_count, kv_count = self.unpack("<IQQ", 20, "the header")
        if version not in VERSIONS:
            old = " (v1 files predate August 2023; convert the model again with a current llama.cpp)" \
                if version == 1 else ""
            raise self.fail(f"GGUF version {version} is not supported (v2 and v3 are){old}")
        room = self.size - _HEAD
        if kv_count > room // _MIN_KV or tensor_count > room // _MIN_TENSOR \
                or kv_count * _MIN_KV + tensor_count * _MIN_TENSOR > room:
            raise self.fail(f"it claims {tensor_count} tensors and {kv_count} metadata keys, more than "
                            f"its {self.size} bytes can hold")
        metadata: dict[str, Any] = {}
        for i in range(kv_count):
            key = self.string(f"metadata key {i}", MAX_KEY)
            if key in metadata:
                raise self.fail(f"metadata key {key!r} appears twice")
            (value_type,) = self.unpack("<I", 4, f"the type of metadata {key!r}")
            metadata[key] = self.value(value_type, f"metadata {key!r}")
        arch = metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise self.fail("no general.architecture in its metadata")
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 \
                or alignment & (alignment - 1) or alignment > 1 << 20:
            raise self.fail(f"general.alignment {alignment!r} is not a power of two up to 1 MiB")
        tensors = self.tensor_table(tensor_count)
        data_start = -(-self.pos // alignment) * alignment
        self.check_data(tensors, data_start, alignment)
        return GgufHeader(self.path, version, self.size, metadata, tuple(tensors), data_start)

    def tensor_table(self, count: int) -> list[GgufTensor]:
        names = _type_names()
        tensors, seen = [], set()
        for i in range(count):
            name = self.string(f"the name of tensor {i}", MAX_NAME)
            if name in seen:
                raise self.fail(f"tensor {name!r} appears twice")
            seen.add(name)
            (n_dims,) = self.unpack("<I", 4, f"the dimension count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
            dims = self.unpack(f"<{n_dims}Q", 8 * n_dims, f"the shape of tensor {name!r}")
            type_id, offset = self.unpack("<IQ", 12, f"the type of tensor {name!r}")
            if type_id not in names or _type_size(names[type_id]) is None:
                raise self.fail(f"tensor {name!r} has the unknown type id {type_id}")
            type_name = names[type_id]
            block, block_bytes = _type_size(type_name)
            if 0 in dims:
                raise self.fail(f"tensor {name!r} has a zero dimension {list(dims)}")
            if dims[0] % block:
                raise self.fail(f"tensor {name!r} of type {type_name} has rows of {dims[0]} values, not whole "
                                f"blocks of {block}")
            elements = 1
            for d in dims:
                elements *= d
                if elements > self.size * block:  # cannot fit whatever the type: stop before the number grows
                    raise self.fail(f"tensor {name!r} has the shape {list(dims)}, larger than the file")
            tensors.append(GgufTensor(name, tuple(dims), type_name, offset, elements // block * block_bytes))
        return tensors

    def check_data(self, tensors: list[GgufTensor], data_start: int, alignment: int) -> None:
        end = data_start
        for t in sorted(tensors, key=lambda t: t.offset):
            if t.offset % alignment:
                raise self.fail(f"tensor {t.name!r} starts at offset {t.offset}, not a multiple of the "
                                f"alignment {alignment}")
            start = data_start + t.offset
            if start < end:
                raise self.fail(f"tensor {t.name!r} overlaps the one before it")
            end = start + t.nbytes
            if end > self.size:
                raise self.fail(f"tensor {t.name!r} ({t.type_name} {list(t.dims)}, {t.nbytes} bytes at offset "
                                f"{t.offset}) ends past the end of the file ({self.size} bytes; truncated?)")
