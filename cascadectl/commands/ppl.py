"""`cascadectl ppl`: streaming perplexity with any cache policy, or several policies on the same tokens."""
from __future__ import annotations

from array import array
from typing import Annotated, Optional

import typer

from engine.errors import ConfigError
from engine.models import load_model
from engine.perplexity import perplexity
from engine.runner import Runner
from engine.sizing import long_input_config, route
from engine.tokens import iter_token_ids

from .. import answering as a
from .. import checkpoints as ck
from .. import corpus
from .. import launch
from .. import options as o
from .. import plot as plots
from ..common import ChunkInterrupts, handle_errors, require_text, resolve_sources
from ..console import Say, TokenProgress, fill_text
from ..inputs import InputError, InputReport, iter_segments, sources_label, total_bytes_estimate
from ..ppl_report import PplRun, render

@handle_errors
def ppl(
    ctx: typer.Context,
    sources: o.Sources = None,
    model: o.Model = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    device_map: o.DeviceMap = "none",
    policy: o.Policy = o.DEFAULTS["policy"],
    cache_size: o.AutoCacheSize = o.DEFAULTS["cache_size"],
    memory: o.Memory = None,
    cascades: o.Cascades = o.DEFAULTS["cascades"],
    sinks: o.Sinks = o.DEFAULTS["sinks"],
    beta: o.Beta = o.DEFAULTS["beta"],
    head_reduce: o.HeadReduce = o.DEFAULTS["head_reduce"],
    stride: o.Stride = o.DEFAULTS["stride"],
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
    names = [p.strip() for p in compare.split(",") if p.strip()] if compare else [policy]
    settings = dict(cascades=cascades, sinks=sinks, beta=beta, head_reduce=head_reduce, stride=stride)
    requested = [a.cache_settings(ctx, name, cache_size, memory, **settings) for name in names]
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
        load = lambda dev: load_model(model, dev, dtype, notify=Say.info, device_map=device_map)  # noqa: E731
        return corpus.ppl_each(srcs, configs[0], load, device, device_map, json_out, quiet, auto)
    opts = ck.CheckpointOptions(checkpoint, checkpoint_every, resume)
    opts.check()
    if opts.path and len(configs) > 1:
        raise ConfigError("--checkpoint follows one policy; drop --compare (or run each policy on its own)")
    lm = load_model(model, device, dtype, notify=Say.info, device_map=device_map)
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

    report = InputReport()
    n_bytes = [0]

    def texts():
        for segment in iter_segments(srcs, report=report):
            n_bytes[0] += len(segment.text.encode("utf-8", "replace"))
            yield segment.text

    pieces = iter_token_ids(lm.tokenizer, texts())
    if len(configs) == 1 and sizings[0] is not None:
        configs[0], sizings[0], pieces = route(pieces, configs[0], sizings[0], lm.model, lm.max_positions)
        Say.info(f"[dim]{sizings[0].describe()}[/]")
    elif any(sizings):
        Say.info(f"[dim]--compare with --cache-size auto: every policy reads through a {sizings[-1].cache_size:,}-token "
                 f"cache sized to the model, never the exact route (give --cache-size to choose it)[/]")
    ids = None
    if len(configs) > 1 or configs[0].policy == "full":  # several passes over the same tokens, or a length check
        ids = array("l")
        for piece in pieces:
            ids.extend(piece)
        for config in configs:
            config.check_positions(config.sinks, lm.max_positions, len(ids))
    total_bytes = total_bytes_estimate(srcs)

    runs = []
    ckpt = None
    for config, sizing in zip(configs, sizings):
        ckpt = ck.for_run(opts, lm, config, "ppl")
        with Runner(lm.model, config, expected_tokens=len(ids) if ids is not None else 0) as runner, \
                TokenProgress(f"ppl {config.policy}", len(ids) if ids is not None else None, quiet) as progress, \
                ChunkInterrupts() as stop:
            chunks, result = ck.ppl_stream(ckpt, opts, runner, (ids.tolist(),) if ids is not None else pieces,
                                           config.policy)

            def on_chunk(done: int) -> None:
                total = len(ids) if ids is not None else _estimate_total(done, report.bytes_read, total_bytes)
                progress.update(done, total, fill_text(runner.cache.fill()))
                ck.after_chunk(stop, ckpt, done, lambda: ckpt.save(runner.cache, *ck.ppl_state(result)),
                               lambda: f"interrupted after {done:,} tokens: PPL so far {result.ppl:.4f} +/- "
                                       f"{result.ppl_err:.4f} ({config.policy})")

            result = perplexity(runner, chunks, on_chunk=on_chunk, keep_nll=plot is not None, result=result)
            runs.append(PplRun(config, result, runner.cache.nbytes(), runner.n_sinks, sizing))
    first = runs[0].result
    require_text(report, srcs, first.n_scored + (first.carry is not None))  # tokens fed: n_tokens says 0 for 1
    if not runs[0].result.n_scored:
        raise InputError(f"{sources_label(srcs)}: a single token; perplexity needs at least two")
    Say.skipped(report.skipped)
    render(runs, lm, srcs, report, n_bytes[0], json_out)
    if plot:
        plots.nll_by_position(plot, [(run.config.policy, run.result.nll) for run in runs])
        Say.info(f"[dim]wrote {plot}[/]")
    ck.done(ckpt)


def _estimate_total(done: int, bytes_read: int, total_bytes: int) -> int | None:
    """Tokens expected overall, from the bytes read so far (unknown for stdin)."""
    if not total_bytes or not bytes_read:
        return None
    return int(done * total_bytes / bytes_read)
