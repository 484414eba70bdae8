"""`cascadectl ppl`: streaming perplexity with any cache policy, or several policies on the same tokens."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from engine.errors import ConfigError
from engine.models import load_model
from engine.perplexity import PerplexityResult, perplexity_steps
from engine.runner import Runner
from engine.sizing import long_input_config, route

from .. import checkpoints as ck
from .. import corpus
from .. import corpus_ppl
from .. import launch
from .. import options as o
from .. import plot as plots
from ..common import handle_errors, require_text, resolve_sources
from ..console import Say, fill_text
from ..driver import InputTokens, drive, read_all
from ..inputs import InputError, sources_label
from ..ppl_report import PplRun, render
from ..settings import CacheRequest


@handle_errors
@o.cache_options
def ppl(
    ctx: typer.Context,
    sources: o.Sources = None,
    model: o.Model = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    weights: o.Weights = "auto",
    device_map: o.DeviceMap = "none",
    cache: CacheRequest = None,  # the cache options (options.CACHE_OPTIONS)
    compare: Annotated[Optional[str], typer.Option(
        "--compare", rich_help_panel="Cache", help="Policies to run on the same tokens, e.g. full,sink,cascade."
    )] = None,
    json_out: o.Json = False,
    quiet: o.Quiet = False,
    each: corpus.Each = False,
    nproc: launch.Nproc = None,
    checkpoint: ck.CheckpointFile = None,
    checkpoint_every: ck.CheckpointEvery = ck.DEFAULT_EVERY,
    resume: ck.Resume = False,
    plot: Annotated[Optional[str], typer.Option(
        "--plot", rich_help_panel="Output", show_default=False, metavar="FILE.png",
        help="Draw NLL against position (moving average over 1K tokens) for each policy into a PNG.")] = None,
) -> None:
    """Perplexity of a long text through the cache, streamed in one pass.

    Examples:

      cascadectl ppl book.txt

      cascadectl ppl book.txt --compare sink,cascade --cache-size 2048

      cat notes.md | cascadectl ppl --json

      cascadectl ppl corpus/ --each --nproc 4          (4 worker processes, one per GPU)
    """
    Say.quiet = quiet
    launch.require_each(nproc, each)
    srcs = resolve_sources(sources)
    names = [p.strip() for p in compare.split(",") if p.strip()] if compare else [None]
    requested = [cache.config(name) for name in names]
    configs, auto = [config for config, _ in requested], requested[0][1]
    if plot:
        if each or resume:  # a resumed run has no per-token NLL from before the checkpoint
            raise ConfigError(f"--plot draws one uninterrupted stream: drop {'--each' if each else '--resume'}")
        plots.require(plot)
    if each:  # a row per file, maybe over --nproc or torchrun processes: each loads its own model (corpus.py)
        if len(configs) > 1:
            raise ConfigError("--each runs one --policy; drop --compare (compare policies on single files)")
        if checkpoint or resume:
            raise ConfigError("--checkpoint/--resume follow one stream; with --each, rerun the files that failed")
        if (n := launch.processes(nproc, device, device_map)) > 1:  # this command again in n workers (launch.py)
            corpus.list_corpus(srcs)  # a missing path fails here, once, not in every worker
            return launch.run_workers(n, ctx)
        load = lambda dev: load_model(model, dev, dtype, weights=weights, notify=Say.info,  # noqa: E731
                                      device_map=device_map, decodes=False)
        return corpus_ppl.ppl_each(srcs, configs[0], load, device, device_map, json_out, quiet, auto)
    opts = ck.CheckpointOptions(checkpoint, checkpoint_every, resume)
    opts.check()
    if opts.path and len(configs) > 1:
        raise ConfigError("--checkpoint follows one policy; drop --compare (or run each policy on its own)")
    lm = load_model(model, device, dtype, weights=weights, notify=Say.info, device_map=device_map, decodes=False)
    sizings = [None] * len(configs)
    if auto is not None:  # each policy's cache sized to the model; one policy alone reads a fitting input exactly
        budget = auto.budget(lm.device)
        for i, config in enumerate(configs):
            if config.policy != "full":
                configs[i], sizings[i] = long_input_config(config, lm.model, lm.max_positions, config.sinks, 0,
                                                           budget, auto.stride)
    for config in configs:
        if config.policy != "full":
            config.check_positions(config.sinks, lm.max_positions)

    tokens = InputTokens(lm.tokenizer, srcs)
    pieces = tokens.pieces
    if len(configs) == 1 and sizings[0] is not None:
        configs[0], sizings[0], pieces = route(pieces, configs[0], sizings[0], lm.model, lm.max_positions)
        Say.info(f"[dim]{sizings[0].describe()}[/]")
    elif any(sizings):
        Say.info(f"[dim]--compare with --cache-size auto: every policy reads through a {sizings[-1].cache_size:,}-token "
                 f"cache sized to the model, never the exact route (give --cache-size to choose it)[/]")
    ids = None
    if len(configs) > 1 or configs[0].policy == "full":  # several passes over the same tokens, or a length check
        ids = read_all(pieces)
        for config in configs:
            config.check_positions(config.sinks, lm.max_positions, len(ids))

    runs = []
    ckpt = None
    for config, sizing in zip(configs, sizings):
        ckpt = ck.for_run(opts, lm, config, "ppl")
        with Runner(lm.model, config, expected_tokens=len(ids) if ids is not None else 0) as runner:
            chunks, result = ck.ppl_stream(ckpt, opts, runner, (ids,) if ids is not None else pieces,
                                           config.policy)
            drive(perplexity_steps(runner, chunks, result, keep_nll=plot is not None), f"ppl {config.policy}",
                  quiet, len(ids) if ids is not None else None, tokens.estimate_total,
                  fill=lambda: fill_text(runner.cache.fill()), ckpt=ckpt,
                  save=lambda: ckpt.save(runner.cache, *ck.ppl_state(result)),
                  partial=lambda done: _partial(done, result))
            runs.append(PplRun(config, result, runner.cache.nbytes(), runner.n_sinks, sizing))
    first = runs[0].result
    require_text(tokens.report, srcs, first.n_scored + (first.carry is not None))  # tokens fed: n_tokens says 0 for 1
    if not runs[0].result.n_scored:
        raise InputError(f"{sources_label(srcs)}: a single token; perplexity needs at least two")
    Say.skipped(tokens.report.skipped)
    render(runs, lm, srcs, tokens.report, tokens.text_bytes, json_out)
    if plot:
        plots.nll_by_position(plot, [(run.config.policy, run.result.nll) for run in runs])
        Say.info(f"[dim]wrote {plot}[/]")
    ck.done(ckpt)


def _partial(done: int, result: PerplexityResult) -> str:
    return (f"interrupted after {done:,} tokens: PPL so far {result.ppl:.4f} +/- {result.ppl_err:.4f} "
            f"({result.policy})")
