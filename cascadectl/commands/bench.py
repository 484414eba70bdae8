"""`cascadectl bench passkey|retention`: offline long-context evidence on the embedded model or any --model.

Both compare policies at the same cache size on the same deterministic samples (engine/bench), show progress
and a table on stderr, print `--json` on stdout and draw `--plot FILE.png`. The defaults finish in minutes on a
2-core CPU with the embedded model (a 512-token cache, so that 16× the cache is 8K tokens); `--quick` is a
smoke run of a minute or two."""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated, Optional

import typer

from engine.bench import passkey as pk
from engine.bench import retention as rt
from engine.bench.grid import parse_choices, parse_counts, parse_depths
from engine.bench.text import Noise, Prose
from engine.config import CacheConfig
from engine.errors import ConfigError
from engine.models import load_model
from engine.retention import DEFAULT_WEIGHT

from .. import bench_report as report
from .. import options as o
from .. import plot as plots
from ..answering import given
from ..common import handle_errors
from ..console import Say, TokenProgress

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                  help="Offline long-context benchmarks: passkey retrieval and retention of a repeated segment.")

CACHE_SIZE, STRIDE = 512, 256  # small enough that 16x and 64x the cache (8K, 32K tokens) are in reach on a CPU
Policies = Annotated[str, typer.Option(
    "--policy", "-p", rich_help_panel="Cache",
    help="Policies compared at the same cache size (full only where the model's positions allow).")]
Samples = Annotated[int, typer.Option("--samples", rich_help_panel="Benchmark", help="Samples per cell.")]
Seed = Annotated[int, typer.Option("--seed", rich_help_panel="Benchmark", help="Seed of keys, offsets, segments.")]
Text = Annotated[Optional[str], typer.Option(
    "--text", rich_help_panel="Benchmark", show_default=False, metavar="FILE",
    help="Prose to use instead of the bundled novel (data/pride_and_prejudice.txt).")]
Quick = Annotated[bool, typer.Option("--quick", rich_help_panel="Benchmark",
                                     help="A tiny grid (a minute or two): a smoke test, not a measurement.")]
Plot = Annotated[Optional[str], typer.Option("--plot", rich_help_panel="Output", show_default=False,
                                             metavar="FILE.png", help="Draw the results into a PNG.")]


def _settings(cache_size: int, cascades: int, sinks: int, beta: float, head_reduce: str, stride: int) -> dict:
    return dict(cache_size=cache_size, cascades=cascades, sinks=sinks, beta=beta, head_reduce=head_reduce,
                stride=stride)


def _quick(ctx: typer.Context, quick: bool, values: dict, quick_values: dict) -> dict:
    """With --quick, the grid options that were left at their defaults take their quick values."""
    if not quick:
        return values
    return {k: (quick_values[k] if k in quick_values and not given(ctx, k) else v) for k, v in values.items()}


@app.command("passkey")
@handle_errors
def passkey(
    ctx: typer.Context,
    lengths: Annotated[str, typer.Option("--lengths", rich_help_panel="Benchmark",
                                         help="Prompt lengths in tokens (2k = 2048).")] = "2k,8k",
    depths: Annotated[str, typer.Option("--depths", rich_help_panel="Benchmark",
                                        help="Where the key sits in the filler, fractions in (0, 1).")] = "0.1,0.5,0.9",
    samples: Samples = 1,
    seed: Seed = 0,
    filler: Annotated[str, typer.Option("--filler", rich_help_panel="Benchmark",
                                        help="noise (repeated sentences) or prose (the bundled novel).")] = "noise",
    text: Text = None,
    prompt: Annotated[str, typer.Option("--prompt", rich_help_panel="Benchmark",
                                        help="Question first (pinned before the document, guiding the cascade) "
                                             "and/or last (only after it).")] = "first,last",
    policy: Policies = "full,sink,cascade",
    model: o.Model = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    cache_size: o.CacheSize = CACHE_SIZE,
    cascades: o.Cascades = o.DEFAULTS["cascades"],
    sinks: o.Sinks = o.DEFAULTS["sinks"],
    beta: o.Beta = o.DEFAULTS["beta"],
    head_reduce: o.HeadReduce = o.DEFAULTS["head_reduce"],
    stride: o.Stride = STRIDE,
    question_weight: Annotated[float, typer.Option("--question-weight", rich_help_panel="Cache",
                                                   help="λ of question-guided retention (question first).")]
    = DEFAULT_WEIGHT,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-t", rich_help_panel="Generation",
                                            help="Tokens decoded (greedy) after the prompt.")] = 12,
    quick: Quick = False,
    json_out: o.Json = False,
    plot: Plot = None,
    quiet: o.Quiet = False,
) -> None:
    """Passkey retrieval: a 5-digit key inside long filler, at each length × depth; exact and per-digit accuracy.

    Examples:

      cascadectl bench passkey --quick

      cascadectl bench passkey --lengths 2k,8k,32k --depths 0.1,0.3,0.5,0.7,0.9 --prompt first,last

      cascadectl bench passkey --filler prose --policy sink,cascade --json --plot passkey.png
    """
    Say.quiet = quiet
    grid = _quick(ctx, quick, dict(lengths=lengths, depths=depths, samples=samples, prompt=prompt),
                  dict(lengths="1k", depths="0.5", samples=1, prompt="last"))
    length_list = parse_counts(grid["lengths"], "--lengths", minimum=1)
    depth_list = parse_depths(grid["depths"])
    prompts = parse_choices(grid["prompt"], "--prompt", pk.PROMPTS)
    names = parse_choices(policy, "--policy")
    if grid["samples"] < 1:
        raise ConfigError(f"--samples must be >= 1 (got {grid['samples']})")
    if filler not in ("noise", "prose"):
        raise ConfigError(f"--filler must be noise or prose (got {filler!r})")
    if question_weight < 0:
        raise ConfigError(f"--question-weight must be >= 0 (got {question_weight})")
    configs = [CacheConfig(policy=p, **_settings(cache_size, cascades, sinks, beta, head_reduce, stride))
               for p in names]
    if plot:
        plots.require(plot)
    lm = load_model(model, device, dtype, notify=Say.info)
    source = Prose(lm.tokenizer, text) if filler == "prose" else Noise(lm.tokenizer)

    plan, skipped, warned = [], [], set()  # every sample is built and checked before any model work
    for n in length_list:
        for d in depth_list:
            for s in range(grid["samples"]):
                for q in prompts:
                    sample = pk.make_sample(lm.tokenizer, source, n, d, s, q, seed)
                    runs = []
                    for config in configs:
                        if config.policy == "full" and not pk.fits_full(sample, max_tokens, lm.max_positions):
                            if not any(k["length"] == n for k in skipped):
                                skipped.append({"policy": "full", "length": n, "reason": (
                                    f"needs {sample.n_tokens + max_tokens:,} positions, the model has "
                                    f"{lm.max_positions:,}")})
                            continue
                        warning = pk.check_sample(config, sample, lm.max_positions, max_tokens,
                                                  pk.is_guided(config, sample, question_weight))
                        if warning and warning not in warned:
                            warned.add(warning)
                            Say.warn(warning)
                        runs.append(config)
                    plan.append((sample, runs))
    for k in skipped:
        Say.info(f"note: full skipped at {report.tokens_label(k['length'])} tokens: it {k['reason']}")

    results: list[pk.PasskeyResult] = []
    total = sum(sample.n_tokens * len(runs) for sample, runs in plan)
    start, done = time.perf_counter(), 0
    try:
        with TokenProgress("passkey", total, quiet) as progress:
            for sample, runs in plan:
                for config in runs:
                    label = f"{config.policy} {report.tokens_label(sample.length)} depth {sample.depth:g}"
                    base = done + len(sample.prefix_ids)

                    def on_chunk(k: int, base=base, label=label) -> None:
                        progress.update(base + k, total, label)

                    results.append(pk.run_sample(lm.model, lm.tokenizer, config, sample, max_tokens,
                                                 question_weight, on_chunk))
                    done += sample.n_tokens
    finally:  # Ctrl-C included: what was measured is still shown
        cells = pk.summarize(results)
        if not quiet and results:
            report.passkey_tables(cells, names, prompts, length_list, depth_list)
    seconds = time.perf_counter() - start
    Say.info(f"[dim]{len(results)} runs, {done:,} tokens in {seconds:.1f} s ({done / max(seconds, 1e-9):,.0f} "
             f"tok/s)[/]")
    if json_out:
        report.write_json({
            "bench": "passkey",
            "settings": {"lengths": length_list, "depths": depth_list, "samples": grid["samples"], "seed": seed,
                         "filler": filler, "text": str(source.path) if filler == "prose" else None,
                         "prompts": prompts, "policies": names, "max_tokens": max_tokens,
                         "question_weight": question_weight, "answer_start": pk.ANSWER_START,
                         "cache": _settings(cache_size, cascades, sinks, beta, head_reduce, stride)},
            "summary": cells,
            "results": [asdict(r) for r in results],
            "skipped": skipped,
            "seconds": seconds,
        }, lm)
    if plot:
        plots.passkey_heatmaps(plot, cells, names, prompts, length_list, depth_list)
        Say.info(f"[dim]wrote {plot}[/]")


@app.command("retention")
@handle_errors
def retention(
    ctx: typer.Context,
    gaps: Annotated[str, typer.Option(
        "--gaps", rich_help_panel="Benchmark",
        help="Gaps between the two copies: multiples of --cache-size (0.5x) or token counts (512, 2k).")]
    = "0.5x,1x,2x,4x,8x,16x",
    samples: Samples = 1,
    seed: Seed = 0,
    segment: Annotated[str, typer.Option("--segment", rich_help_panel="Benchmark",
                                         help="random (token ids from the vocabulary) or prose (a span of the "
                                              "text).")] = "random",
    segment_tokens: Annotated[int, typer.Option("--segment-tokens", rich_help_panel="Benchmark",
                                                help="Length of the repeated segment.")] = 64,
    text: Text = None,
    policy: Policies = "full,sink,cascade",
    model: o.Model = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    cache_size: o.CacheSize = CACHE_SIZE,
    cascades: o.Cascades = o.DEFAULTS["cascades"],
    sinks: o.Sinks = o.DEFAULTS["sinks"],
    beta: o.Beta = o.DEFAULTS["beta"],
    head_reduce: o.HeadReduce = o.DEFAULTS["head_reduce"],
    stride: o.Stride = STRIDE,
    quick: Quick = False,
    json_out: o.Json = False,
    plot: Plot = None,
    quiet: o.Quiet = False,
) -> None:
    """Retention: a segment repeated after a gap; its loss the second time shows how far back each policy holds.

    Examples:

      cascadectl bench retention --quick

      cascadectl bench retention --gaps 0.5x,1x,2x,4x,8x,16x,64x --policy sink,cascade --plot retention.png

      cascadectl bench retention --segment prose --gaps 256,1k,4k --json
    """
    Say.quiet = quiet
    grid = _quick(ctx, quick, dict(gaps=gaps, samples=samples), dict(gaps="0.5x,1x,2x,4x"))
    gap_list = parse_counts(grid["gaps"], "--gaps", unit=cache_size)
    names = parse_choices(policy, "--policy")
    if grid["samples"] < 1:
        raise ConfigError(f"--samples must be >= 1 (got {grid['samples']})")
    if segment not in rt.SEGMENTS:
        raise ConfigError(f"--segment must be random or prose (got {segment!r})")
    if segment_tokens < 2:
        raise ConfigError(f"--segment-tokens must be >= 2 (got {segment_tokens}): its first token is not scored")
    configs = [CacheConfig(policy=p, **_settings(cache_size, cascades, sinks, beta, head_reduce, stride))
               for p in names]
    if plot:
        plots.require(plot)
    lm = load_model(model, device, dtype, notify=Say.info)
    for config in configs:
        if config.policy != "full":
            config.check_positions(config.sinks, lm.max_positions)
    prose = Prose(lm.tokenizer, text)
    vocab = rt.vocabulary(lm.tokenizer, lm.model.config.vocab_size) if segment == "random" else []
    sample_list = [rt.make_sample(prose, vocab, gap_list[-1], segment_tokens, segment, seed, s)
                   for s in range(grid["samples"])]

    fitted, skipped = {}, []  # policy -> the gaps it runs; full stops where positions run out
    for config in configs:
        fitted[config.policy] = [g for g in gap_list if config.policy != "full"
                                 or sample_list[0].positions(g) <= lm.max_positions]
        for g in gap_list:
            if g not in fitted[config.policy]:
                skipped.append({"policy": config.policy, "gap": g, "reason": (
                    f"needs {sample_list[0].positions(g):,} positions, the model has {lm.max_positions:,}")})
    if skipped:
        Say.info(f"note: full skipped at gaps {', '.join(report.tokens_label(k['gap']) for k in skipped)}: more "
                 f"positions than the model's {lm.max_positions:,}")

    def cost(policy: str) -> int:
        g = fitted[policy]
        return 0 if not g else rt.LEAD + segment_tokens * (1 + len(g)) + g[-1]

    runs: list[rt.RetentionRun] = []
    total = sum(cost(c.policy) for c in configs) * len(sample_list)
    start, done = time.perf_counter(), 0
    try:
        with TokenProgress("retention", total, quiet) as progress:
            for sample in sample_list:
                for config in configs:
                    if not fitted[config.policy]:
                        continue

                    def on_tokens(k: int, label=f"{config.policy} sample {sample.sample + 1}") -> None:
                        nonlocal done
                        done += k
                        progress.update(done, total, label)

                    runs.append(rt.run_sample(lm.model, config, sample, fitted[config.policy], on_tokens))
    finally:
        rows = _retention_rows(rt.summarize(runs), cache_size)
        if not quiet and runs:
            report.retention_table(rows, cache_size)
    seconds = time.perf_counter() - start
    Say.info(f"[dim]{len(runs)} passes, {done:,} tokens in {seconds:.1f} s ({done / max(seconds, 1e-9):,.0f} "
             f"tok/s)[/]")
    if json_out:
        report.write_json({
            "bench": "retention",
            "settings": {"gaps": gap_list, "samples": grid["samples"], "seed": seed, "segment": segment,
                         "segment_tokens": segment_tokens, "lead_tokens": rt.LEAD, "text": str(prose.path),
                         "policies": names,
                         "cache": _settings(cache_size, cascades, sinks, beta, head_reduce, stride)},
            "summary": rows,
            "runs": [{"policy": r.policy, "sample": r.sample, "baseline": r.baseline,
                      "gaps": [{"gap": g, "nll": v} for g, v in sorted(r.nll.items())],
                      "tokens": r.tokens, "seconds": r.seconds} for r in runs],
            "skipped": skipped,
            "seconds": seconds,
        }, lm)
    if plot:
        plots.retention_curves(plot, rows, cache_size, segment_tokens)
        Say.info(f"[dim]wrote {plot}[/]")


def _retention_rows(summary: list[dict], cache_size: int) -> list[dict]:
    """Engine summary rows with the gaps as a list (JSON keys must be strings) and relative to the cache."""
    return [{"policy": r["policy"], "samples": r["samples"], "baseline": r["baseline"],
             "gaps": [{"gap": g, "relative": g / cache_size, "nll": v} for g, v in sorted(r["nll"].items())]}
            for r in summary]
