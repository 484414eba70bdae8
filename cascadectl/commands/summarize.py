"""`cascadectl summarize`: one streaming pass over the input, then a summary streamed to stdout."""
from __future__ import annotations

from engine.config import CacheConfig
from engine.models import load_model
from engine.prompt import build_prompt, summary_instruction

from .. import answering as a
from .. import options as o
from ..common import handle_errors, resolve_sources
from ..console import Say


@handle_errors
def summarize(
    sources: o.Sources = None,
    model: o.Model = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    policy: o.Policy = o.DEFAULTS["policy"],
    cache_size: o.CacheSize = o.DEFAULTS["cache_size"],
    cascades: o.Cascades = o.DEFAULTS["cascades"],
    sinks: o.Sinks = o.DEFAULTS["sinks"],
    beta: o.Beta = o.DEFAULTS["beta"],
    head_reduce: o.HeadReduce = o.DEFAULTS["head_reduce"],
    stride: o.Stride = o.DEFAULTS["stride"],
    max_tokens: a.MaxTokens = a.MAX_TOKENS,
    temperature: a.Temperature = 0.0,
    seed: a.Seed = 0,
    words: a.Words = None,
    instruction: a.Instruction = None,
    json_out: o.Json = False,
    quiet: o.Quiet = False,
    report: a.Report = False,
) -> None:
    """Summarize a long text, PDF or folder in one pass through the cascading cache.

    Examples:

      cascadectl summarize book.pdf

      cascadectl summarize notes/ --words 150 --cache-size 2048

      cat report.txt | cascadectl summarize --json
    """
    Say.quiet = quiet
    srcs = resolve_sources(sources)
    config = CacheConfig(policy=policy, cache_size=cache_size, cascades=cascades, sinks=sinks, beta=beta,
                         head_reduce=head_reduce, stride=stride)
    lm = load_model(model, device, dtype, notify=Say.info)
    request = summary_instruction(words, instruction)
    prompt = build_prompt(lm.tokenizer, request, request, cue="Summary:")
    generation = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed, "instruction": request}
    with a.Session(lm, config, srcs, prompt, max_tokens, quiet) as session:
        session.read(len(prompt.suffix_ids))
        text = session.answer(prompt.suffix_ids, temperature, seed, echo=not json_out)
        session.finish({"answer": text}, generation, json_out, report)
