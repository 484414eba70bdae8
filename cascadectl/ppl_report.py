"""Rendering of `ppl` results: a llama.cpp-compatible final line, statistics, a comparison table, or JSON."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.table import Table

from engine.config import CacheConfig
from engine.perplexity import PerplexityResult
from engine.sizing import Sizing

from .common import peak_rss_bytes, versions
from .console import human_bytes


@dataclass
class PplRun:
    config: CacheConfig
    result: PerplexityResult
    cache_bytes: int
    n_sinks: int
    sizing: Sizing | None = None  # --cache-size auto: how the cache was sized (engine/sizing.py)


def _record(run: PplRun, n_bytes: int) -> dict:
    r = run.result
    return {
        "policy": run.config.policy,
        "ppl": r.ppl,
        "ppl_err": r.ppl_err,
        "nll_per_token": r.nll_mean,
        "bits_per_byte": r.bits_per_byte(n_bytes),
        "tokens": r.n_tokens,
        "scored_tokens": r.n_scored,
        "seconds": r.seconds,
        "tokens_per_s": r.tokens_per_s,
        "kv_cache_bytes": run.cache_bytes,
        "settings": asdict(run.config) | {"effective_sinks": run.n_sinks},
        "sizing": run.sizing.as_dict() if run.sizing is not None else None,
    }


def render(runs: list[PplRun], lm, sources: list[str], report, n_bytes: int, as_json: bool) -> None:
    records = [_record(run, n_bytes) for run in runs]
    if as_json:
        doc = {
            "results": records,
            "peak_rss_bytes": peak_rss_bytes(),
            "input": {"sources": sources, "text_bytes": n_bytes, "sha256": report.text_sha256,
                      "files": len(report.files_read), "pages": report.pages_read,
                      "replaced_bytes": report.replaced_bytes, "skipped": report.skipped},
            "model": {"id": lm.model_id, "hash": lm.model_hash, "dtype": str(lm.dtype).removeprefix("torch."),
                      "weights": lm.weights, "device": str(lm.device)},
            "versions": versions(),
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        sys.stdout.flush()  # a closed pipe shows up now, before the caller removes its checkpoint
        return
    out = Console(highlight=False, soft_wrap=True)
    if len(runs) > 1:
        _table(out, runs, records)
    lines = []
    for run, rec in zip(runs, records):
        label = f"[{run.config.policy}] " if len(runs) > 1 else ""
        lines.append(f"{label}Final estimate: PPL = {rec['ppl']:.4f} +/- {rec['ppl_err']:.4f}")
    rec, run = records[-1], runs[-1]
    lines.append(f"nll/token {rec['nll_per_token']:.4f}   bits/byte {rec['bits_per_byte']:.4f}   "
                 f"tokens {rec['tokens']:,}   {rec['tokens_per_s']:,.0f} tok/s ({rec['seconds']:.1f} s)")
    lines.append(f"peak memory {human_bytes(peak_rss_bytes())}   KV cache {human_bytes(run.cache_bytes)}   "
                 f"{_describe(run)}")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def _describe(run: PplRun) -> str:
    c = run.config
    if c.policy == "full":
        fitted = " (--cache-size auto: the input fits the model's positions)" if run.sizing is not None else ""
        return f"policy full (nothing evicted){fitted}"
    subs = f"{c.n_cascades}×{c.cache_size // c.n_cascades}"
    return f"policy {c.policy}: {run.n_sinks} sinks + {subs} slots, stride {c.stride}, beta {c.beta}"


def _table(out: Console, runs: list[PplRun], records: list[dict]) -> None:
    base = records[0]["ppl"]
    table = Table(title=None, box=None, pad_edge=False)
    for col in ("policy", "PPL", "±", f"ΔPPL vs {runs[0].config.policy}", "nll/token", "tok/s", "KV cache"):
        table.add_column(col, justify="right" if col != "policy" else "left")
    for run, rec in zip(runs, records):
        delta = rec["ppl"] - base
        table.add_row(run.config.policy, f"{rec['ppl']:.4f}", f"{rec['ppl_err']:.4f}",
                      f"{delta:+.4f} ({100 * delta / base:+.2f}%)", f"{rec['nll_per_token']:.4f}",
                      f"{rec['tokens_per_s']:,.0f}", human_bytes(run.cache_bytes))
    out.print(table)
