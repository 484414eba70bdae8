"""`cascadectl ppl SOURCES --each`: a perplexity row per file through a fresh cache each, and the
token-weighted total (the file list and the driver: cascadectl/corpus.py)."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict

import typer

from engine.config import CacheConfig
from engine.distributed import world_from_env
from engine.models import LoadedModel
from engine.perplexity import PerplexityResult, perplexity_steps
from engine.runner import Runner
from engine.sizing import Sizing, long_input_config, route
from engine.tokens import rechunk

from .common import EXIT_FAILURE, peak_rss_bytes, require_text, versions
from .console import Say
from .corpus import Corpus, EachRun, Load, finite, list_corpus, model_record, run_each, warn_skipped
from .driver import InputTokens, drive, read_all
from .inputs import InputError
from .settings import AutoSize


def ppl_each(sources: list[str], config: CacheConfig, load: Load, device: str, device_map: str | None,
             json_out: bool, quiet: bool, auto: AutoSize | None = None) -> None:
    """`cascadectl ppl SOURCES --each`: a row per file, the token-weighted total; exit 1 if any file failed."""
    corpus = list_corpus(sources)
    warn_skipped(corpus)

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
        "ppl_err": finite(result.ppl_err),
        "nll_per_token": result.nll_mean,
        "bits_per_byte": finite(result.bits_per_byte(n_bytes)),
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
            "ppl": finite(total.ppl) if n_scored else None,
            "ppl_err": finite(total.ppl_err),
            "nll_per_token": total.nll_mean if n_scored else None,
            "bits_per_byte": finite(total.bits_per_byte(int(n_bytes))),
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
        "model": model_record(run.lm),
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
