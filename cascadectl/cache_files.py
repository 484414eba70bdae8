"""`--save-cache FILE` and `--load-cache FILE`: an ingest kept in a file (engine/snapshot.py) with what
answering from it later needs, its options, and the checks that run before any model is loaded.

The file's `extra` record: kind "ingest"; the pinned prefix (its length and sha256) and the question pinned in
it, if any (the file then answers only that one); the questions whose evidence the store holds; the input's
token count, record and source map (citations); the retention report; the time the ingest took."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

import typer

from engine.cache import KVCache
from engine.checkpoint import ids_sha256
from engine.config import CacheConfig
from engine.errors import CascadeError, ConfigError
from engine.prompt import Prompt
from engine.retention_report import SourceMap
from engine.snapshot import config_of, load_snapshot, save_snapshot

from . import checkpoints as ck
from .common import check_output_path
from .console import Say, human_bytes

SaveCache = Annotated[Optional[str], typer.Option(
    "--save-cache", rich_help_panel="Cache file", show_default=False, metavar="FILE",
    help="Write the cache to FILE after reading the input (its size is the cache's, not the input's).")]
LoadCache = Annotated[Optional[str], typer.Option(
    "--load-cache", rich_help_panel="Cache file", show_default=False, metavar="FILE",
    help="Answer from a --save-cache FILE instead of reading an input; its cache settings apply.")]


@dataclass
class IngestRecord:
    """What `--save-cache` writes beside the cache."""

    prompt: Prompt
    pinned_question: str | None
    evidence_questions: list[str]
    input_tokens: int
    seconds_ingest: float
    input: dict  # the input's record (sha256, sources, files, pages, ...)
    source_map: SourceMap
    retention: dict


def save(path: str, cache: KVCache, lm, config: CacheConfig, record: IngestRecord) -> None:
    """Write `cache` and `record` to `path`, and say so on stderr."""
    extra = {
        "kind": "ingest",
        "evidence_questions": record.evidence_questions,
        "prefix_tokens": len(record.prompt.prefix_ids),
        "prefix_sha256": ids_sha256(record.prompt.prefix_ids),
        "pinned_question": record.pinned_question,
        "input_tokens": record.input_tokens,
        "seconds_ingest": record.seconds_ingest,
        "input": record.input,
        "source_map": {"starts": record.source_map.starts, "labels": record.source_map.labels},
        "retention": record.retention,
    }
    size = save_snapshot(path, cache, lm, config, extra)
    Say.info(f"[dim]saved the cache to {path} ({human_bytes(size)}): answer from it with --load-cache[/]")


@dataclass
class SavedIngest:
    """A `--save-cache` file read back and checked: the cache on the model's device and its record."""

    path: str
    cache: KVCache
    config: CacheConfig
    n_sinks: int
    input_tokens: int
    retention: dict
    input: dict
    evidence_questions: list[str]
    extra: dict

    def source_map(self) -> tuple[int, SourceMap]:
        """(prefix tokens, source map) for the citations of the kept evidence."""
        try:
            smap = self.extra["source_map"]
            return (int(self.extra["prefix_tokens"]),
                    SourceMap(list(smap["starts"]), [tuple(label) for label in smap["labels"]]))
        except (KeyError, TypeError, ValueError):
            raise CascadeError(f"{self.path} is not a usable saved cache (no record of its input)") from None


def load(path: str, lm, explicit: dict, questions: list[str] = ()) -> SavedIngest:
    """Read `path` for `lm`: the settings in `explicit` must agree with the file's, and a file read with a
    question pinned answers only that question."""
    def inspect(meta: dict) -> None:  # before the settings: what the file is matters more
        extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
        if extra.get("kind") != "ingest":
            raise ConfigError(f"{path} is a checkpoint, not a saved cache: resume it with --checkpoint {path} "
                              f"--resume")
        pinned = extra.get("pinned_question")
        if pinned is not None and list(questions) != [pinned]:
            raise ConfigError(f"{path} was read with the question {pinned!r} pinned before the input, so it "
                              f"only answers that question; save it with --no-question-first to ask any")

    cache, meta, _ = load_snapshot(path, lm, explicit, inspect)
    extra = meta["extra"]
    try:
        tokens, retention, record = int(extra["input_tokens"]), dict(extra["retention"]), dict(extra["input"])
        str(record["sha256"])
    except (KeyError, TypeError, ValueError):
        raise CascadeError(f"{path} is not a usable saved cache (no record of its input)") from None
    return SavedIngest(path, cache, config_of(meta), meta["n_sinks"], tokens, retention, record,
                       extra.get("evidence_questions") or [], extra)


def check_cache_files(save_cache: str | None, load_cache: str | None, checkpoint: ck.CheckpointOptions) -> None:
    """Option errors of --save-cache, --load-cache and --checkpoint, before any model is loaded or input read."""
    checkpoint.check()
    if save_cache and load_cache:
        raise ConfigError("--save-cache and --load-cache together: the file already holds this cache")
    if load_cache and checkpoint.path:
        raise ConfigError("--load-cache reads no input, so there is nothing to checkpoint: drop --checkpoint")
    if save_cache:
        check_output_path(save_cache, "--save-cache")


