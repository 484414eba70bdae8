"""`cascadectl bench ruler`: RULER-style tasks (multi-key, multi-value, variable tracking) in long filler.

The command surface only: its options (task × length × sample × prompt-order grid, filler, question weight,
evidence slots), their checks, then the output (a table per prompt order on stderr, --json on stdout). The
samples and scoring are engine.bench.ruler (the reading is passkey's, engine.bench.passkey.read_and_answer), the
planning and the run loop cascadectl.bench_runs, the tables and JSON cascadectl.bench_report."""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict
from typing import Annotated, Optional

import typer

from engine.bench import ruler
from engine.bench.grid import BENCH_POLICIES, parse_choices, parse_counts
from engine.bench.passkey import PROMPTS
from engine.bench.text import Noise, Prose
from engine.errors import ConfigError
from engine.models import load_model
from engine.retention import DEFAULT_WEIGHT

from .. import bench_report as report
from .. import bench_runs
from .. import options as o
from ..common import handle_errors
from ..console import Say
from . import bench_options as b


@handle_errors
def ruler_bench(
    ctx: typer.Context,
    tasks: Annotated[str, typer.Option("--tasks", rich_help_panel="Benchmark",
                                       help="multikey, multivalue and/or vartrack.")] = ",".join(ruler.TASKS),
    lengths: b.Lengths = "2k,8k",
    samples: b.Samples = 2,
    seed: b.Seed = 0,
    filler: b.Filler = "noise",
    text: b.Text = None,
    prompt: Annotated[str, typer.Option("--prompt", rich_help_panel="Benchmark",
                                        help="Question first (pinned before the document, guiding the cascade and "
                                             "the evidence store) and/or last (only after it).")] = "first",
    policy: b.Policies = "full,sink,cascade,cascade+evidence",
    model: o.Model = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    weights: o.Weights = "auto",
    cache_size: o.CacheSize = b.CACHE_SIZE,
    cascades: o.Cascades = o.DEFAULTS["cascades"],
    sinks: o.Sinks = o.DEFAULTS["sinks"],
    beta: o.Beta = o.DEFAULTS["beta"],
    head_reduce: o.HeadReduce = o.DEFAULTS["head_reduce"],
    stride: o.Stride = b.STRIDE,
    evidence: b.Evidence = None,
    question_weight: b.QuestionWeight = DEFAULT_WEIGHT,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", "-t", rich_help_panel="Generation", show_default=False,
        help="Tokens decoded (greedy) after the prompt. Default: multikey 12, multivalue 32, vartrack 32.")] = None,
    quick: b.Quick = False,
    json_out: o.Json = False,
    quiet: o.Quiet = False,
) -> None:
    """RULER-style tasks: several facts at random depths of long filler; score = share of expected strings found.

    multikey asks for one of 4 magic numbers, multivalue for all 4 numbers of one word.

    vartrack asks for the 5 variables of a chain of assignments. Exact = every expected string is in the answer.

    Examples:

      cascadectl bench ruler --quick

      cascadectl bench ruler --tasks multikey --lengths 8k --samples 10 --policy sink,cascade,cascade+evidence

      cascadectl bench ruler --filler prose --prompt first,last --json > ruler.json
    """
    Say.quiet = quiet
    grid = b.apply_quick(ctx, quick, dict(lengths=lengths, samples=samples, prompt=prompt),
                         dict(lengths="1k", samples=1, prompt="first"))
    task_list = ruler.parse_tasks(tasks)
    length_list = parse_counts(grid["lengths"], "--lengths", minimum=1)
    prompts = parse_choices(grid["prompt"], "--prompt", PROMPTS)
    names = parse_choices(policy, "--policy", BENCH_POLICIES)
    if grid["samples"] < 1:
        raise ConfigError(f"--samples must be >= 1 (got {grid['samples']})")
    if filler not in ("noise", "prose"):
        raise ConfigError(f"--filler must be noise or prose (got {filler!r})")
    if question_weight < 0:
        raise ConfigError(f"--question-weight must be >= 0 (got {question_weight})")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1 (got {max_tokens})")
    settings = b.cache_settings(cache_size, cascades, sinks, beta, head_reduce, stride)
    configs, slots = b.policy_configs(names, settings, evidence)
    lm = load_model(model, device, dtype, weights=weights, notify=Say.info)
    source = Prose(lm.tokenizer, text) if filler == "prose" else Noise(lm.tokenizer)
    points = itertools.product(task_list, length_list, range(grid["samples"]), prompts)
    plan, skipped = bench_runs.ruler_plan(lm, source, configs, points, seed, max_tokens, question_weight)
    bench_runs.note_skipped(skipped)
    layers = bench_runs.evidence_layers(lm, plan)

    results: list[ruler.RulerResult] = []
    start = time.perf_counter()
    try:
        done = bench_runs.ruler_run(lm, plan, max_tokens, question_weight, quiet, results, layers)
    finally:  # Ctrl-C included: what was measured is still shown
        cells = ruler.summarize(results)
        means = ruler.task_means(cells)
        if not quiet and results:
            report.ruler_tables(cells, means, task_list, names, prompts, length_list)
    seconds = time.perf_counter() - start
    Say.info(f"[dim]{len(results)} runs, {done:,} tokens in {seconds:.1f} s ({done / max(seconds, 1e-9):,.0f} "
             f"tok/s)[/]")
    if json_out:
        report.write_json({
            "bench": "ruler",
            "settings": {"tasks": task_list, "lengths": length_list, "samples": grid["samples"], "seed": seed,
                         "filler": filler, "text": str(source.path) if filler == "prose" else None,
                         "prompts": prompts, "policies": names,
                         "max_tokens": {t: ruler.TASKS[t].max_tokens if max_tokens is None else max_tokens
                                        for t in task_list},
                         "keys": ruler.KEYS, "values": ruler.VALUES, "hops": ruler.HOPS,
                         "question_weight": question_weight, "cache": settings, "evidence": slots,
                         "evidence_layers": sorted(layers or {})},
            "summary": cells,
            "means": means,
            "results": [asdict(r) for r in results],
            "skipped": skipped,
            "seconds": seconds,
        }, lm)
