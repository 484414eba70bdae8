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
other ranks on stderr start with their rank."""
from __future__ import annotations

import json
import math
import os
import stat
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import torch
import typer
from rich.markup import escape

from engine.config import CacheConfig
from engine.distributed import (World, agree, all_reduce_sums, gather_to_main, process_group, rank_device,
                                shard_by_size, world_from_env)
from engine.errors import CascadeError, ConfigError
from engine.generate import Sampling
from engine.models import LoadedModel
from engine.perplexity import PerplexityResult, perplexity_steps
from engine.prompt import Prompt
from engine.runner import Runner
from engine.sizing import Sizing, long_input_config, route
from engine.tokens import rechunk

from .answering import Session
from .common import EXIT_FAILURE, peak_rss_bytes, require_text, versions
from .console import Say
from .driver import InputTokens, drive, read_all
from .flags import render
from .generation import record as generation_record
from .inputs import SNIFF_BYTES, InputError, InputReport, is_pdf, looks_binary, walk
from .settings import AutoSize

Each = Annotated[bool, typer.Option(
    "--each", rich_help_panel="Output",
    help="One result per file (folders walked); with --nproc (or torchrun) the files are shared out.")]
Out = Annotated[Optional[Path], typer.Option(
    "--out", "-o", rich_help_panel="Output", show_default=False,
    help="With --each: folder for one FILE.summary.md per input file (paths mirrored) and index.json.")]
SkipExisting = Annotated[bool, typer.Option(
    "--skip-existing", rich_help_panel="Output", help="With --each: keep summaries already in --out (resume).")]

SUMMARY_SUFFIX = ".summary.md"
INDEX_NAME = "index.json"

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


def _warn_skipped(corpus: Corpus) -> None:
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


def _model_record(lm: LoadedModel) -> dict:
    return {"id": lm.model_id, "hash": lm.model_hash, "dtype": str(lm.dtype).removeprefix("torch."),
            "device": str(lm.device), "device_map": lm.device_map}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN


# ------------------------------------------------------------------------------------------------ ppl --each


def ppl_each(sources: list[str], config: CacheConfig, load: Load, device: str, device_map: str | None,
             json_out: bool, quiet: bool, auto: AutoSize | None = None) -> None:
    """`cascadectl ppl SOURCES --each`: a row per file, the token-weighted total; exit 1 if any file failed."""
    corpus = list_corpus(sources)
    _warn_skipped(corpus)

    sized: dict[int, tuple[CacheConfig, Sizing | None]] = {}  # per loaded model: --cache-size auto's choice

    def load_checked(dev: str) -> LoadedModel:
        lm = load(dev)
        chosen, sizing = config, None
        if auto is not None and config.policy != "full":
            chosen, sizing = long_input_config(config, lm.model, lm.max_positions, config.sinks, 0,
                                               auto.budget(lm.device), auto.stride)
        if chosen.policy != "full":
            chosen.check_positions(chosen.sinks, lm.max_positions)
        sized[id(lm)] = chosen, sizing
        return lm

    def work(lm: LoadedModel, path: str, label: str) -> dict:
        chosen, sizing = sized[id(lm)]
        return _file_perplexity(lm, chosen, path, label, quiet or world_from_env().distributed, sizing)

    run = run_each(corpus.files, device, device_map, load_checked, work, _ppl_sums, _ppl_line, quiet)
    n_failed = int(run.sums[7])
    if run.world.is_main:
        doc = _ppl_document(run, corpus, config)
        if json_out:
            sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        else:
            _ppl_table(doc)
        if n_failed:
            Say.error(f"{n_failed} of {len(corpus.files)} files failed (listed above); the total covers the others")
    if n_failed:
        raise typer.Exit(EXIT_FAILURE)


def _file_perplexity(lm: LoadedModel, config: CacheConfig, path: str, label: str, quiet: bool,
                     sizing: Sizing | None = None) -> dict:
    """One file through a fresh cache: the same tokens and chunks as `cascadectl ppl FILE` (with `sizing`, an
    input that fits is read exactly)."""
    tokens = InputTokens(lm.tokenizer, [path])
    pieces, n_ids = tokens.pieces, 0
    if sizing is not None:
        config, sizing, pieces = route(pieces, config, sizing, lm.model, lm.max_positions)
    if config.policy == "full":  # positions grow with the input: count it before any model work
        ids = read_all(pieces)
        config.check_positions(config.sinks, lm.max_positions, len(ids))
        pieces, n_ids = [ids], len(ids)
    result = PerplexityResult(config.policy)
    with Runner(lm.model, config, expected_tokens=n_ids) as runner:
        drive(perplexity_steps(runner, rechunk(pieces, config.stride), result), label, quiet, n_ids or None,
              tokens.estimate_total, partial=lambda done: f"interrupted after {done:,} tokens of {path}")
    report, n_bytes = tokens.report, tokens.text_bytes
    require_text(report, [path], result.n_scored + (result.carry is not None))  # tokens fed (n_tokens: 0 for 1)
    if not result.n_scored:
        raise InputError(f"{path}: a single token; perplexity needs at least two")
    return {
        "tokens": result.n_tokens,
        "scored_tokens": result.n_scored,
        "nll_sum": result.nll_sum,
        "nll_sq_sum": result.nll_sq_sum,
        "ppl": result.ppl,
        "ppl_err": _finite(result.ppl_err),
        "nll_per_token": result.nll_mean,
        "bits_per_byte": _finite(result.bits_per_byte(n_bytes)),
        "text_bytes": n_bytes,
        "seconds": result.seconds,
        "tokens_per_s": result.tokens_per_s,
        "input_sha256": report.text_sha256,
        "policy": config.policy,
        "cache_size": config.cache_size,
    }


def _ppl_sums(rows: list[dict]) -> list[float]:
    ok = [r for r in rows if r["status"] == "ok"]
    return [sum(r["nll_sum"] for r in ok), sum(r["nll_sq_sum"] for r in ok), sum(r["scored_tokens"] for r in ok),
            sum(r["tokens"] for r in ok), sum(r["text_bytes"] for r in ok), sum(r["seconds"] for r in ok),
            len(ok), len(rows) - len(ok)]


def _ppl_line(row: dict) -> str:
    err = f" ± {row['ppl_err']:.4f}" if row["ppl_err"] is not None else ""
    return f"PPL {row['ppl']:.4f}{err} · {row['tokens']:,} tokens · {row['tokens_per_s']:,.0f} tok/s"


def _ppl_document(run: EachRun, corpus: Corpus, config: CacheConfig) -> dict:
    nll_sum, nll_sq_sum, n_scored, n_tokens, n_bytes, busy, n_ok, n_failed = run.sums
    total = PerplexityResult(config.policy, n_scored=int(n_scored), nll_sum=nll_sum, nll_sq_sum=nll_sq_sum)
    return {
        "files": run.rows,
        "total": {  # token-weighted: every scored token of every file counts once
            "ppl": _finite(total.ppl) if n_scored else None,
            "ppl_err": _finite(total.ppl_err),
            "nll_per_token": total.nll_mean if n_scored else None,
            "bits_per_byte": _finite(total.bits_per_byte(int(n_bytes))),
            "tokens": int(n_tokens),
            "scored_tokens": int(n_scored),
            "text_bytes": int(n_bytes),
            "files": int(n_ok),
            "failed": int(n_failed),
            "wall_seconds": run.seconds,
            "busy_seconds": busy,  # summed over ranks
            "tokens_per_s": n_tokens / run.seconds if run.seconds else 0.0,
            "files_per_s": (n_ok + n_failed) / run.seconds if run.seconds else 0.0,
        },
        "skipped": corpus.skipped,
        "world_size": run.world.size,
        "settings": asdict(config) | {"effective_sinks": config.sinks},
        "model": _model_record(run.lm),
        "peak_rss_bytes": peak_rss_bytes(),  # rank 0's
        "versions": versions(),
    }


def _ppl_table(doc: dict) -> None:
    """Plain aligned columns (not a rich table: piped output must not fold long paths)."""
    ranks = doc["world_size"] > 1
    head = ["file", "tokens", "PPL", "±", "nll/token", "bits/byte", "tok/s"] + (["rank"] if ranks else [])
    rows = [head]
    for r in doc["files"]:
        rank = [str(r["rank"])] if ranks else []
        if r["status"] != "ok":
            rows.append([r["file"], "", "failed", "", "", "", ""] + rank)
            continue
        err = f"{r['ppl_err']:.4f}" if r["ppl_err"] is not None else "-"
        bpb = f"{r['bits_per_byte']:.4f}" if r["bits_per_byte"] is not None else "-"
        rows.append([r["file"], f"{r['tokens']:,}", f"{r['ppl']:.4f}", err, f"{r['nll_per_token']:.4f}", bpb,
                     f"{r['tokens_per_s']:,.0f}"] + rank)
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             .rstrip() for row in rows]
    lines += [f"failed: {r['file']}: {r['error']}" for r in doc["files"] if r["status"] != "ok"]
    t = doc["total"]
    if t["ppl"] is not None:
        err = f"{t['ppl_err']:.4f}" if t["ppl_err"] is not None else "nan"
        lines.append(f"Final estimate: PPL = {t['ppl']:.4f} +/- {err}")
        lines.append(f"total over {t['files']} file{'s' if t['files'] != 1 else ''} (token-weighted): "
                     f"nll/token {t['nll_per_token']:.4f}   tokens {t['tokens']:,}   "
                     f"{t['tokens_per_s']:,.0f} tok/s ({t['wall_seconds']:.1f} s, {doc['world_size']} "
                     f"process{'es' if doc['world_size'] != 1 else ''})")
    sys.stdout.write("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ summarize --each


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
    _warn_skipped(corpus)
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
        with Session(lm, config, [path], prompt, job.max_tokens, quiet or distributed, sizing=auto) as session:
            session.read(len(prompt.suffix_ids))
            text = session.answer(prompt.suffix_ids, job.sampling_for(lm), echo=False)
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
            "model": _model_record(run.lm),
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
