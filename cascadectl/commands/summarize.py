"""`cascadectl summarize`: one streaming pass over the input, then a summary streamed to stdout."""
from __future__ import annotations

import typer

from engine.config import CacheConfig
from engine.errors import ConfigError
from engine.models import load_model
from engine.prompt import build_prompt, summary_instruction

from .. import answering as a
from .. import cache_files as cf
from .. import checkpoints as ck
from .. import corpus
from .. import corpus_summaries
from .. import generation as g
from .. import launch
from .. import options as o
from ..common import handle_errors, resolve_sources
from ..console import Say
from ..settings import CacheRequest


@handle_errors
@o.cache_options
def summarize(
    ctx: typer.Context,
    sources: o.Sources = None,
    model: o.Model = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    weights: o.Weights = "auto",
    device_map: o.DeviceMap = "none",
    cache: CacheRequest = None,  # the cache options (options.CACHE_OPTIONS)
    max_tokens: g.MaxTokens = g.MAX_TOKENS,
    temperature: g.Temperature = None,
    top_p: g.TopP = None,
    top_k: g.TopK = None,
    min_p: g.MinP = None,
    repeat_penalty: g.RepeatPenalty = None,
    no_repeat_ngram: g.NoRepeatNgram = None,
    seed: g.Seed = 0,
    words: g.Words = None,
    instruction: g.Instruction = None,
    json_out: o.Json = False,
    quiet: o.Quiet = False,
    report: g.Report = False,
    each: corpus.Each = False,
    out: corpus.Out = None,
    skip_existing: corpus.SkipExisting = False,
    nproc: launch.Nproc = None,
    save_cache: cf.SaveCache = None,
    load_cache: cf.LoadCache = None,
    checkpoint: ck.CheckpointFile = None,
    checkpoint_every: ck.CheckpointEvery = ck.DEFAULT_EVERY,
    resume: ck.Resume = False,
) -> None:
    """Summarize a long text, PDF or folder in one pass through the cascading cache.

    Examples:

      cascadectl summarize book.pdf

      cascadectl summarize notes/ --words 150 --cache-size 2048

      cat report.txt | cascadectl summarize --json

      cascadectl summarize papers/ --each --out summaries/ --nproc auto

      cascadectl summarize book.pdf --save-cache book.kv

      cascadectl summarize --load-cache book.kv --words 50
    """
    Say.quiet = quiet
    launch.require_each(nproc, each)
    sampling_for = g.sampling_for(temperature, top_p, top_k, min_p, repeat_penalty, seed, no_repeat_ngram)
    resumable = ck.CheckpointOptions(checkpoint, checkpoint_every, resume)
    cf.check_cache_files(save_cache, load_cache, resumable)
    if load_cache and sources:
        raise ConfigError("--load-cache answers from the file: give no SOURCE")
    srcs = [] if load_cache else resolve_sources(sources)
    config, auto = (CacheConfig(), None) if load_cache else cache.config()  # a --load-cache file's own
    if (out is not None or skip_existing) and not each:
        raise ConfigError("--out and --skip-existing go with --each (one summary file per input file)")
    if each:  # one summary file per input file, maybe over --nproc or torchrun processes, each with its model
        if report:
            raise ConfigError("--report describes one input; with --each, see index.json in --out")
        if checkpoint or resume or save_cache or load_cache:
            raise ConfigError("--checkpoint, --resume and the cache files follow one input; with --each, "
                              "--skip-existing resumes a run")
        request = summary_instruction(words, instruction)
        if (n := launch.processes(nproc, device, device_map)) > 1:  # this command again in n workers (launch.py)
            corpus.list_corpus(srcs, exclude=corpus_summaries.check_out(out))  # checked here, once, not in every worker
            return launch.run_workers(n, ctx)
        job = corpus_summaries.SummaryJob(lambda tok: build_prompt(tok, request, request, cue="Summary:"), max_tokens,
                                sampling_for, {"max_tokens": max_tokens, "instruction": request})
        load = lambda dev: load_model(model, dev, dtype, weights=weights, notify=Say.info,  # noqa: E731
                                      device_map=device_map)
        return corpus_summaries.summarize_each(srcs, out, skip_existing, config, load, device, device_map, job, json_out,
                                     quiet, auto)
    lm = load_model(model, device, dtype, weights=weights, notify=Say.info, device_map=device_map)
    request = summary_instruction(words, instruction)
    prompt = build_prompt(lm.tokenizer, request, request, cue="Summary:")
    sampling = sampling_for(lm)
    generation = {"max_tokens": max_tokens, **g.record(sampling, lm), "instruction": request}
    with a.Session(lm, config, srcs, prompt, max_tokens, quiet, sizing=auto, frozen=True) as session:
        if load_cache:
            session.load(load_cache, cache.explicit(), len(prompt.suffix_ids))
        else:
            session.read(len(prompt.suffix_ids), resumable, "summarize")
        if save_cache:
            session.save(save_cache)
        text, generation["batch"] = session.answer_one(prompt.suffix_ids, sampling, echo=not json_out)
        session.finish({"answer": text}, generation, json_out, report)
