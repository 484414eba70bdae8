"""`--each`: one result per file of a corpus, in one process or sharded over several (--nproc or torchrun).

    cascadectl ppl corpus/ --each                                  # per-file perplexity + token-weighted total
    cascadectl ppl corpus/ --each --nproc 4                        # the same, files spread over 4 GPUs
    torchrun --nproc-per-node 4 -m cascadectl ppl corpus/ --each   # the same, started by torchrun
    cascadectl summarize corpus/ --each --out summaries/           # one summary file per input file

Every process lists the same files (folders walked as for one stream: name order; hidden files, and binary
files found in folders, skipped), takes its share by size (engine.distributed.shard_by_size), loads its own
copy of the model on cuda:LOCAL_RANK (or the CPU) and runs its files one by one, each through a fresh cache,
exactly as a single-file run would. A file that fails (unreadable, no text, a single token, out of memory)
becomes a row with a one-line reason and the others go on; the exit code is then 1. Sums are all-reduced and
rows gathered with torch.distributed; only rank 0 prints to stdout and writes the index. Progress lines of the
other ranks on stderr start with their rank.

This module holds the file list and the driver; the rows of `ppl --each` are corpus_ppl.py's, the summaries
of `summarize --each` corpus_summaries.py's."""
from __future__ import annotations

import math
import os
import stat
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import torch
import typer
from rich.markup import escape

from engine.distributed import (World, agree, all_reduce_sums, gather_to_main, process_group, rank_device,
                                shard_by_size, world_from_env)
from engine.errors import CascadeError, ConfigError
from engine.models import LoadedModel

from .console import Say
from .flags import render
from .inputs import SNIFF_BYTES, InputError, InputReport, is_pdf, looks_binary, walk

Each = Annotated[bool, typer.Option(
    "--each", rich_help_panel="Output",
    help="One result per file (folders walked); with --nproc (or torchrun) the files are shared out.")]
Out = Annotated[Optional[Path], typer.Option(
    "--out", "-o", rich_help_panel="Output", show_default=False,
    help="With --each: folder for one FILE.summary.md per input file (paths mirrored) and index.json.")]
SkipExisting = Annotated[bool, typer.Option(
    "--skip-existing", rich_help_panel="Output", help="With --each: keep summaries already in --out (resume).")]


Load = Callable[[str], LoadedModel]  # device -> model; the command binds its --model/--dtype/--device-map
Work = Callable[[LoadedModel, str, str], dict]  # (model, path, progress label) -> the row's fields


# ------------------------------------------------------------------------------------------------ the file list


@dataclass
class Corpus:
    files: list[str]  # in name order, as a single run would read them
    skipped: list[tuple[str, str]]  # (path, reason) of folder entries not read
    root: str  # deepest folder holding every source: summaries mirror paths relative to it


def list_corpus(sources: list[str], exclude: Path | None = None) -> Corpus:
    """The files of `sources`: files as given, folders walked; `exclude` (the --out folder) is never read."""
    if any(s == "-" for s in sources):
        raise ConfigError("--each reads files and folders, not stdin; save the text to a file")
    files: list[str] = []
    report = InputReport()
    skip_under = os.path.realpath(exclude) + os.sep if exclude is not None else None
    for source in sources:
        if not os.path.exists(source):
            raise InputError(f"{source}: no such file or directory; check the path")
        if not os.path.isdir(source):
            files.append(os.path.normpath(source))
            continue
        st = os.stat(source)
        for path in walk(source, report, {(st.st_dev, st.st_ino)}):
            if skip_under and os.path.realpath(path).startswith(skip_under):
                continue
            if _binary(path):
                report.skip(path, "binary")
            else:
                files.append(path)
    if not files:
        raise InputError(f"no files to read in {', '.join(sources)}; point --each at files or a folder of them")
    folders = [os.path.abspath(s if os.path.isdir(s) else os.path.dirname(s) or ".") for s in sources]
    return Corpus(files, report.skipped, os.path.commonpath(folders))


def warn_skipped(corpus: Corpus) -> None:
    """The folder entries left out, on stderr, once (by rank 0 under torchrun)."""
    if world_from_env().is_main:
        Say.skipped(corpus.skipped)


def _binary(path: str) -> bool:
    # the same test a folder run applies; an unreadable file is left to fail with its own reason
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return False
    return not is_pdf(path, head) and looks_binary(head)


def _size(path: str) -> int:
    with suppress(OSError):
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
    return 0


# ------------------------------------------------------------------------------------------------ the driver


@dataclass
class EachRun:
    world: World
    lm: LoadedModel
    rows: list[dict] | None  # every rank's rows in file order, on rank 0; None elsewhere
    sums: list[float]  # the all-reduced sums, the same on every rank
    seconds: float  # wall time from the model being ready to the results gathered


def run_each(files: list[str], device: str, device_map: str | None, load: Load, work: Work,
             sums: Callable[[list[dict]], list[float]], describe: Callable[[dict], str], quiet: bool) -> EachRun:
    """Run `work` on this rank's share of `files`; all-reduce `sums(rows)`, gather the rows on rank 0."""
    world = world_from_env()
    if world.distributed and (device_map or "none").lower() == "auto":
        raise ConfigError("--device-map auto spreads one process over every GPU, but torchrun gives each process "
                          "its own GPU; use one or the other")
    dev = rank_device(world, device)
    comm = torch.device(dev) if world.distributed else torch.device("cpu")
    mine = shard_by_size([_size(f) for f in files], world.size)[world.rank]
    prefix = f"rank {world.rank}: " if world.distributed else ""
    with process_group(world, comm):
        lm, error = None, None
        try:
            lm = load(dev)
        except Exception as e:  # noqa: BLE001 - re-raised by agree(), after the other ranks have heard of it
            error = e
        agree(error, world)  # one rank's failed load stops every rank, none is left waiting
        if world.distributed:
            Say.info(f"{prefix}{len(mine)} of {len(files)} files on {lm.device}")
        start = time.perf_counter()
        rows = []
        for n, i in enumerate(mine, 1):
            label = f"{prefix}({n}/{len(mine)}) {files[i]}"
            row = _attempt(work, lm, files[i], label, world)
            row["index"] = i
            rows.append(row)
            if row["status"] == "failed":
                Say.warn(f"{prefix}{files[i]}: failed: {row['error']}")
            else:
                Say.info(escape(f"{label}: {describe(row)}"))
        totals = all_reduce_sums(sums(rows), world, comm)
        gathered = gather_to_main(rows, world)
        seconds = time.perf_counter() - start
    every = None
    if gathered is not None:  # rank 0: back in file order
        every = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
        for r in every:
            del r["index"]
    return EachRun(world, lm, every, totals, seconds)


def _attempt(work: Work, lm: LoadedModel, path: str, label: str, world: World) -> dict:
    """One file's row; any failure becomes the row's one-line reason, so one bad file never costs the others."""
    row: dict[str, Any] = {"file": path, "status": "ok", "error": None, "rank": world.rank}
    try:
        row.update(work(lm, path, label))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - reported in the row; the run goes on with the next file
        row.update(status="failed", error=_reason(e))
        if isinstance(e, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
    return row


def _reason(e: BaseException) -> str:
    text = render((str(e).strip().splitlines() or [""])[0])
    if isinstance(e, (CascadeError, InputError)):
        return text
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return "out of memory; lower --cache-size or --stride"
    return f"{type(e).__name__}: {text}"[:300]


def model_record(lm: LoadedModel) -> dict:
    return {"id": lm.model_id, "hash": lm.model_hash, "dtype": str(lm.dtype).removeprefix("torch."),
            "weights": lm.weights, "device": str(lm.device), "device_map": lm.device_map}


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN
