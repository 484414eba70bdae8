"""`cascadectl summarize SOURCES --each --out DIR`: one summary file per input file, each read through a
fresh cache, then DIR/index.json (the file list and the driver: cascadectl/corpus.py)."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import typer
from rich.markup import escape

from engine.config import CacheConfig
from engine.distributed import world_from_env
from engine.errors import ConfigError
from engine.generate import Sampling
from engine.models import LoadedModel
from engine.prompt import Prompt

from .answering import Session
from .common import EXIT_FAILURE, versions
from .console import Say
from .corpus import Load, list_corpus, model_record, run_each, warn_skipped
from .generation import record as generation_record
from .settings import AutoSize

SUMMARY_SUFFIX = ".summary.md"
INDEX_NAME = "index.json"


@dataclass
class SummaryJob:
    """What `summarize` asks of every file; the same seed for each, so a file's summary does not depend on
    which process read it."""

    prompt_for: Callable[[Any], Prompt]  # tokenizer -> the prompt (instruction pinned, request after the input)
    max_tokens: int
    sampling_for: Callable[[LoadedModel], Sampling]  # the options over the model's generation_config
    generation: dict  # for the index, with the sampling settings added


def summarize_each(sources: list[str], out: Path | None, skip_existing: bool, config: CacheConfig, load: Load,
                   device: str, device_map: str | None, job: SummaryJob, json_out: bool, quiet: bool,
                   auto: AutoSize | None = None) -> None:
    """`cascadectl summarize SOURCES --each --out DIR`: DIR/<path>.summary.md per file, then DIR/index.json."""
    out = check_out(out)
    corpus = list_corpus(sources, exclude=out)
    warn_skipped(corpus)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out {out} ({e.strerror or e}); choose a writable folder") from e
    prompts: dict[int, Prompt] = {}

    def work(lm: LoadedModel, path: str, label: str) -> dict:
        relative = os.path.relpath(os.path.abspath(path), corpus.root) + SUMMARY_SUFFIX
        target = out / relative
        if skip_existing and target.is_file():
            return {"status": "skipped", "summary": relative}
        prompt = prompts.setdefault(id(lm), job.prompt_for(lm.tokenizer))
        Say.info(escape(label))
        distributed = world_from_env().distributed
        with Session(lm, config, [path], prompt, job.max_tokens, quiet or distributed, sizing=auto,
                     frozen=True) as session:
            session.read(len(prompt.suffix_ids))
            text, _ = session.answer_one(prompt.suffix_ids, job.sampling_for(lm), echo=False)
        # each process writes its own files as they finish: a crash or Ctrl-C keeps every summary done so far
        write_text_atomic(target, text.strip() + "\n")
        stats = session.stats
        return {"summary": relative, "tokens": stats.tokens, "generated_tokens": stats.generated_tokens,
                "seconds": stats.seconds_ingest + stats.seconds_generate, "input_sha256": session.input.text_sha256,
                "policy": session.config.policy, "cache_size": session.config.cache_size}

    def sums(rows: list[dict]) -> list[float]:
        return [sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")] + \
            [sum(r.get("tokens", 0) for r in rows), sum(r.get("generated_tokens", 0) for r in rows)]

    def describe(row: dict) -> str:
        if row["status"] == "skipped":
            return f"kept {out / row['summary']} (--skip-existing)"
        return f"{row['tokens']:,} tokens read, {row['generated_tokens']} written -> {out / row['summary']}"

    run = run_each(corpus.files, device, device_map, load, work, sums, describe, quiet)
    n_ok, n_kept, n_failed, n_tokens, n_generated = (int(x) for x in run.sums)
    if run.world.is_main:
        index = {
            "files": run.rows,
            "total": {"written": n_ok, "kept": n_kept, "failed": n_failed, "tokens": n_tokens,
                      "generated_tokens": n_generated, "wall_seconds": run.seconds},
            "out": str(out),
            "root": corpus.root,
            "skipped": corpus.skipped,
            "world_size": run.world.size,
            "settings": asdict(config) | {"auto_cache_size": auto is not None},
            "generation": {**job.generation, **generation_record(job.sampling_for(run.lm), run.lm)},
            "model": model_record(run.lm),
            "versions": versions(),
        }
        text = json.dumps(index, indent=2, ensure_ascii=False) + "\n"
        write_text_atomic(out / INDEX_NAME, text)
        if json_out:
            sys.stdout.write(text)
        else:
            for r in run.rows:
                shown = r["error"] if r["status"] == "failed" else str(out / r["summary"])
                sys.stdout.write(f"{r['file']}\t{r['status']}\t{shown}\n")
        Say.info(escape(f"{n_ok} written, {n_kept} kept, {n_failed} failed; index in {out / INDEX_NAME}"))
        if n_failed:
            Say.error(f"{n_failed} of {len(corpus.files)} files failed (listed above)")
    if n_failed:
        raise typer.Exit(EXIT_FAILURE)


def check_out(out: Path | None) -> Path:
    """The --out folder of `summarize --each`, refused before any work when missing or a file."""
    if out is None:
        raise ConfigError("--each needs --out DIR: one summary file per input file is written there")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder (it is created if missing)")
    return out


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder, fsync and rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
