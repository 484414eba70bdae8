"""Rendering of `cascadectl bench` results: tables on stderr, one JSON document on stdout."""
from __future__ import annotations

import json
import sys

from rich.table import Table

from .common import peak_rss_bytes, versions
from .console import console


def model_record(lm) -> dict:
    return {"id": lm.model_id, "hash": lm.model_hash, "dtype": str(lm.dtype).removeprefix("torch."),
            "weights": lm.weights, "device": str(lm.device), "max_positions": lm.max_positions}


def write_json(doc: dict, lm) -> None:
    doc = {**doc, "model": model_record(lm), "peak_rss_bytes": peak_rss_bytes(), "versions": versions()}
    sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def tokens_label(n: int) -> str:
    """2048 -> '2k' (the notation of --lengths), other counts with separators."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


def passkey_tables(cells: list[dict], policies: list[str], prompts: list[str], lengths: list[int],
                   depths: list[float]) -> None:
    """One table per prompt order: a row per policy and depth, a column per length; 'exact% (per-digit%)'."""
    index = {(c["policy"], c["prompt"], c["length"], c["depth"]): c for c in cells}
    for prompt in prompts:
        console.print(f"[bold]passkey, question {prompt}[/]: exact key (per digit)")
        table = Table(box=None, pad_edge=False)
        table.add_column("policy")
        table.add_column("depth", justify="right")
        for n in lengths:
            table.add_column(tokens_label(n), justify="right")
        for policy in policies:
            rows = [(f"{d:g}", [index.get((policy, prompt, n, d)) for n in lengths]) for d in depths]
            if len(depths) > 1:  # the policy's mean over depths, per length
                mean = []
                for j in range(len(lengths)):
                    got = [r[1][j] for r in rows if r[1][j] is not None]
                    mean.append(None if not got else {"exact": sum(c["exact"] for c in got) / len(got),
                                                      "digits": sum(c["digits"] for c in got) / len(got)})
                rows.append(("mean", mean))
            for i, (depth, row) in enumerate(rows):
                table.add_row(policy if i == 0 else "", depth, *[_cell(c) for c in row],
                              end_section=i == len(rows) - 1)
        console.print(table)


def _cell(c: dict | None) -> str:
    if c is None:
        return "[dim]-[/]"
    return f"{c['exact']:.0%} ({c['digits']:.0%})"


def ruler_tables(cells: list[dict], means: list[dict], tasks: list[str], policies: list[str], prompts: list[str],
                 lengths: list[int]) -> None:
    """One table per prompt order: a row per policy and task (and their mean), a column per length;
    'score% (exact%)'."""
    index = {(c["task"], c["policy"], c["prompt"], c["length"]): c for c in cells}
    index.update({("mean", m["policy"], m["prompt"], m["length"]): m for m in means})
    rows = tasks + (["mean"] if len(tasks) > 1 else [])
    for prompt in prompts:
        console.print(f"[bold]RULER-style tasks, question {prompt}[/]: mean score (exact)")
        table = Table(box=None, pad_edge=False)
        table.add_column("policy")
        table.add_column("task")
        for n in lengths:
            table.add_column(tokens_label(n), justify="right")
        for policy in policies:
            for i, task in enumerate(rows):
                got = [index.get((task, policy, prompt, n)) for n in lengths]
                table.add_row(policy if i == 0 else "", task,
                              *["[dim]-[/]" if c is None else f"{c['score']:.0%} ({c['exact']:.0%})" for c in got],
                              end_section=i == len(rows) - 1)
        console.print(table)


def retention_table(rows: list[dict], cache_size: int) -> None:
    """A row per policy: the no-copy baseline, then the second copy's mean NLL at every gap."""
    gaps = sorted({g["gap"] for r in rows for g in r["gaps"]})
    console.print("[bold]retention[/]: mean NLL of the repeated segment by gap (tokens; × cache size)")
    table = Table(box=None, pad_edge=False)
    table.add_column("policy")
    table.add_column("no copy", justify="right")
    for g in gaps:
        table.add_column(f"{tokens_label(g)} ({g / cache_size:g}x)", justify="right")
    for r in rows:
        by_gap = {g["gap"]: g["nll"] for g in r["gaps"]}
        table.add_row(r["policy"], f"{r['baseline']:.3f}",
                      *[f"{by_gap[g]:.3f}" if g in by_gap else "[dim]-[/]" for g in gaps])
    console.print(table)
