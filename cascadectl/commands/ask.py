"""`cascadectl ask`: read the input once with the question pinned before it, then stream the answer."""
from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from engine.config import CacheConfig
from engine.errors import ConfigError
from engine.models import load_model
from engine.prompt import ASK_INSTRUCTION, ASK_INSTRUCTION_LATER, ASK_REQUEST, build_prompt
from engine.evidence import QUOTE
from engine.retention import DEFAULT_WEIGHT

from .. import answering as a
from .. import cache_files as cf
from .. import checkpoints as ck
from .. import generation as g
from .. import options as o
from ..common import handle_errors, resolve_sources
from ..console import Say
from ..settings import CacheRequest, given

Args = Annotated[Optional[list[str]], typer.Argument(
    metavar="SOURCE... QUESTION", show_default=False,
    help="Files, folders or PDFs ('-' for stdin), then the question (unless given with -q).")]
Questions = Annotated[Optional[list[str]], typer.Option(
    "--question", "-q", rich_help_panel="Generation", show_default=False,
    help="A question; repeat for several (one ingest; the answers are decoded together, see --batch).")]
QuestionFirst = Annotated[bool, typer.Option(
    "--question-first/--no-question-first", rich_help_panel="Cache",
    help="Pin the question before the input so that it guides what the cache keeps (one question only).")]
QuestionWeight = Annotated[float, typer.Option(
    "--question-weight", rich_help_panel="Cache",
    help="λ: weight of the question's attention in the retention scores, relative to the text's own.")]
Evidence = Annotated[Optional[int], typer.Option(
    "--evidence", rich_help_panel="Cache", show_default=False, metavar="SLOTS",
    help="Slots of --cache-size set aside for whole passages the question points at, kept however far back "
         "(question first, cascade only; 0 = off). Default: 1/8 of the cache in spans of 32 tokens.")]
Quote = Annotated[int, typer.Option(
    "--quote", rich_help_panel="Generation", metavar="N",
    help="Quote the N strongest evidence passages right before the question when the cache had to evict "
         "(the answer reads them where a small model attends best); 0 = off.")]
Batch = Annotated[bool, typer.Option(
    "--batch/--no-batch", rich_help_panel="Generation",
    help="Answer from the cache frozen after reading (nothing evicted while answering; several questions "
         "decoded together, one batch per step); --no-batch answers one by one, each from a copy of the cache "
         "that keeps evicting as it writes.")]
Quiet = Annotated[bool, typer.Option("--quiet", rich_help_panel="Output", help="Only errors on stderr.")]


@handle_errors
@o.cache_options
def ask(
    ctx: typer.Context,
    args: Args = None,
    question: Questions = None,
    model: o.Model = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    weights: o.Weights = "auto",
    device_map: o.DeviceMap = "none",
    cache: CacheRequest = None,  # the cache options (options.CACHE_OPTIONS)
    question_first: QuestionFirst = True,
    question_weight: QuestionWeight = DEFAULT_WEIGHT,
    evidence: Evidence = None,
    quote: Quote = QUOTE,
    batch: Batch = True,
    max_tokens: g.MaxTokens = g.MAX_TOKENS,
    temperature: g.Temperature = None,
    top_p: g.TopP = None,
    top_k: g.TopK = None,
    min_p: g.MinP = None,
    repeat_penalty: g.RepeatPenalty = None,
    no_repeat_ngram: g.NoRepeatNgram = None,
    seed: g.Seed = 0,
    json_out: o.Json = False,
    quiet: Quiet = False,
    report: g.Report = False,
    save_cache: cf.SaveCache = None,
    load_cache: cf.LoadCache = None,
    checkpoint: ck.CheckpointFile = None,
    checkpoint_every: ck.CheckpointEvery = ck.DEFAULT_EVERY,
    resume: ck.Resume = False,
) -> None:
    """Answer a question about a long text, PDF or folder, read in one pass through the cascading cache.

    The question is pinned before the input as well as asked after it, so it guides what the cache keeps.

    Examples:

      cascadectl ask book.pdf "Who signed the treaty?"

      cat notes.md | cascadectl ask - "What is due on Friday?"

      cascadectl ask corpus/ -q "Who wrote it?" -q "When?" --json

      cascadectl ask book.pdf --save-cache book.kv "Who signed the treaty?"

      cascadectl ask --load-cache book.kv "When was it signed?"
    """
    Say.quiet = quiet
    sampling_for = g.sampling_for(temperature, top_p, top_k, min_p, repeat_penalty, seed, no_repeat_ngram)
    resumable = ck.CheckpointOptions(checkpoint, checkpoint_every, resume)
    cf.check_cache_files(save_cache, load_cache, resumable)
    args = list(args or [])
    questions = list(question or [])
    if not questions:
        if not args or (len(args) == 1 and os.path.exists(args[0])):  # `ask book.txt`: a path, not a question
            raise ConfigError("no question: give it after the input, e.g. ask book.txt \"Who is ...?\" (or -q)")
        questions = [args.pop()]
    if any(not q.strip() for q in questions):
        raise ConfigError("the question is empty")
    if question_weight < 0:
        raise ConfigError(f"--question-weight must be >= 0 (got {question_weight})")
    if evidence is not None and evidence < 0:
        raise ConfigError(f"--evidence must be >= 0 (got {evidence})")
    if quote < 0:
        raise ConfigError(f"--quote must be >= 0 (got {quote})")
    if load_cache and args:
        raise ConfigError("--load-cache answers from the file: give no SOURCE, only the question")
    srcs = [] if load_cache else resolve_sources(args)
    config, auto = (CacheConfig(), None) if load_cache else cache.config()  # a --load-cache file's own
    lm = load_model(model, device, dtype, weights=weights, notify=Say.info, device_map=device_map)
    first = question_first and len(questions) == 1  # several questions share one question-agnostic ingest
    if save_cache and first and not given(ctx, "question_first"):  # a file that answers any question
        first = False
        Say.info("note: --save-cache reads the input without pinning the question, so that the file answers any "
                 "question; it keeps evidence for this one (--question-first keeps the guided read; the file then "
                 "answers only this question)")
    prompts = [build_prompt(lm.tokenizer, ASK_INSTRUCTION if first else ASK_INSTRUCTION_LATER, ASK_REQUEST, q,
                            question_first=first) for q in questions]
    sampling = sampling_for(lm)
    generation = {"max_tokens": max_tokens, **g.record(sampling, lm), "questions": questions,
                  "question_first": first, "question_weight": question_weight, "quote": quote}
    slots, probes = 0, None
    several = not first and (len(questions) > 1 or save_cache is not None)  # known, not pinned: probed
    if (first or several) and config.policy == "cascade" and not load_cache:
        slots = evidence  # None: the default share of the cache, once it is sized
        if several and evidence != 0:  # each question's queries taken beforehand, each with its share
            probes = [build_prompt(lm.tokenizer, ASK_INSTRUCTION, ASK_REQUEST, q, question_first=True)
                      for q in questions]
    elif evidence:
        Say.info("note: --evidence needs the questions before the input (not --no-question-first with one "
                 "question) and --policy cascade: off")
    together = batch  # from the frozen cache, one question or several, where it can (frozen_refusal, below)
    with a.Session(lm, config, srcs, prompts[0], max_tokens, quiet, question_weight if first else 0.0,
                   slots, auto, probes, frozen=together) as session:
        longest = max(len(p.suffix_ids) for p in prompts)
        if load_cache:
            session.load(load_cache, cache.explicit(), longest, questions)
        else:
            session.read(longest, resumable, "ask")
        if save_cache:
            session.save(save_cache, questions[0] if first else None, questions)
        generation["evidence"] = session.config.evidence if not load_cache else 0
        suffixes = [session.closing(i, p.suffix_ids, quote) for i, p in enumerate(prompts)]
        refusal = session.frozen_refusal(suffixes) if together else None
        if refusal:
            together = False
            how = "answering one by one" if len(questions) > 1 else "answering from the evicting cache"
            Say.info(f"note: {how}: {refusal}")
        generation["batch"] = together
        if together:
            headers = [f"## {q}" for q in questions] if len(questions) > 1 else [None]
            texts = session.answer_together(suffixes, sampling, None if json_out else headers)
        else:
            texts = []
            for i, (q, suffix) in enumerate(zip(questions, suffixes)):
                if len(questions) > 1 and not json_out:
                    print(f"{'' if i == 0 else chr(10)}## {q}", flush=True)
                texts.append(session.answer(suffix, sampling, echo=not json_out, fork=i < len(questions) - 1,
                                            question=session.store_index(i)))
        answers = [{"question": q, "answer": text, "evidence": session.evidence_for(i)}
                   for i, (q, text) in enumerate(zip(questions, texts))]
        doc = {"answer": answers[0]["answer"]} if len(answers) == 1 else {}
        session.finish({**doc, "answers": answers, "evidence": session.evidence}, generation, json_out, report)
