"""The engine from Python: open a model, read a text once through a cache, then perplexity, a summary, answers,
and cache files. Re-exported by `engine` (`import engine; engine.open_model()`).

    lm = open_model()                                   # the embedded SmolLM2-135M; never downloads
    config = CacheConfig(cache_size=256, stride=64)     # any policy: "cascade" (default), "sink", "full"
    perplexity_of(lm, text, config).ppl
    doc = read(lm, text, config, summary_prompt(lm))    # one pass; the cache is the document's memory
    doc.answer()                                        # the cache unchanged: ask again, or save it
    doc.save("book.kv"); load(lm, "book.kv").answer()   # the same answer, without reading the text again

These are the same pieces the CLI drives (engine.reading, engine.perplexity, engine.snapshot), without what
only the CLI adds: input files and PDFs, progress, checkpoints, question-guided retention and the evidence
store of `ask` (cascadectl/answering.py). Errors are engine.errors types whose messages name the setting to
change as its keyword (`cache_size`)."""
from __future__ import annotations

from typing import Iterable, Iterator

from .batch_answer import answer_together, frozen_batch, frozen_refusal
from .config import CacheConfig
from .errors import CascadeError
from .generate import GREEDY, Sampling
from .models import LoadedModel, load_model
from .perplexity import PerplexityResult, perplexity_steps
from .prompt import ASK_INSTRUCTION, ASK_REQUEST, Prompt, build_prompt, summary_instruction
from .reading import answer, check_room, forked, ingest_steps, stop_ids
from .runner import Runner
from .snapshot import config_of, load_snapshot, save_snapshot
from .tokens import iter_token_ids, rechunk

# (not `perplexity` or `tokens`: `engine.perplexity` and `engine.tokens` are modules)
__all__ = ["CacheConfig", "Document", "GREEDY", "LoadedModel", "PerplexityResult", "Prompt", "Sampling", "ask",
           "ask_prompt", "load", "open_model", "perplexity_of", "read", "summarize", "summary_prompt", "token_ids"]

Text = str | Iterable[str] | Iterable[list[int]]  # a string, text pieces, or token-id pieces


def open_model(model: str | None = None, device: str = "auto", dtype: str = "auto",
               device_map: str | None = None) -> LoadedModel:
    """A model and its tokenizer, offline: None is the embedded SmolLM2-135M-Instruct; else a local folder, an
    id already in the Hugging Face cache, FILE.gguf or ollama:NAME[:TAG] (engine.models.load_model)."""
    return load_model(model, device, dtype, device_map=device_map)


def token_ids(lm: LoadedModel, text: Text) -> Iterator[list[int]]:
    """Token-id pieces of `text`, tokenized as a stream (a long text is never held as one tokenizer call)."""
    if isinstance(text, str):
        return iter_token_ids(lm.tokenizer, [text])
    it = iter(text)
    first = next(it, None)
    if first is None:
        return iter(())
    if isinstance(first, str):
        return iter_token_ids(lm.tokenizer, _chain(first, it))
    return _chain(list(first), (list(piece) for piece in it))


def _chain(first, rest) -> Iterator:
    yield first
    yield from rest


def perplexity_of(lm: LoadedModel, text: Text, config: CacheConfig = CacheConfig(), keep_nll: bool = False) -> \
        PerplexityResult:
    """Perplexity of `text` read once through `config`'s cache (`full` counts the text first: its positions
    must fit the model's)."""
    pieces = token_ids(lm, text)
    n = 0
    if config.policy == "full":
        ids = [i for piece in pieces for i in piece]
        config.check_positions(config.sinks, lm.max_positions, len(ids))
        pieces, n = [ids], len(ids)
    else:
        config.check_positions(config.sinks, lm.max_positions)
    result = PerplexityResult(config.policy)
    with Runner(lm.model, config, expected_tokens=n) as runner:
        for _ in perplexity_steps(runner, rechunk(pieces, config.stride), result, keep_nll):
            pass
    return result


def summary_prompt(lm: LoadedModel, words: int | None = None, instruction: str | None = None) -> Prompt:
    """The prompt `summarize` reads with: the instruction pinned before the text, the request after it."""
    request = summary_instruction(words, instruction)
    return build_prompt(lm.tokenizer, request, request, cue="Summary:")


def ask_prompt(lm: LoadedModel, question: str) -> Prompt:
    """A question pinned before the text (so the cache keeps what it asks about) and asked again after it."""
    return build_prompt(lm.tokenizer, ASK_INSTRUCTION, ASK_REQUEST, question, question_first=True)


class Document:
    """A text read once through a cache: `answer` closes the prompt and decodes without changing the cache (from
    its frozen view, or a copy), so one reading answers any number of times; `save` writes the cache to a file that
    `load` reads back."""

    def __init__(self, lm: LoadedModel, runner: Runner, prompt: Prompt, input_tokens: int):
        self.lm, self.runner, self.prompt, self.input_tokens = lm, runner, prompt, input_tokens

    @property
    def config(self) -> CacheConfig:
        return self.runner.config

    def answer(self, suffix_ids: list[int] | None = None, max_tokens: int = 256, sampling: Sampling = GREEDY,
               frozen: bool = True) -> str:
        """The answer to the prompt's closing request (or to `suffix_ids`). It is decoded from the frozen cache
        (engine/batch_answer.py: nothing evicted while it is written, a cheaper step; the CLI's default) where the
        model's positions and free memory allow it (`frozen_refusal`), else, and with `frozen=False`, from a copy
        of the cache that evicts as it writes. Neither changes the document's cache."""
        suffix = self.prompt.suffix_ids if suffix_ids is None else suffix_ids
        check_room(self.config, self.runner.n_sinks, self.lm.max_positions, len(suffix), max_tokens,
                   self.runner.cache.seen if self.config.policy == "full" else None)
        stop, room = stop_ids(self.lm.tokenizer, self.lm.model), len(suffix) + max_tokens
        if frozen and frozen_refusal(self.runner, 1, room) is None:
            batch = frozen_batch(self.runner, 1, room)
            return "".join(piece for _, piece, _ in answer_together(batch, self.lm.tokenizer, [suffix], max_tokens,
                                                                    sampling, stop))
        with forked(self.runner):
            return "".join(answer(self.runner, self.lm.tokenizer, suffix, max_tokens, sampling, stop))

    def save(self, path: str) -> int:
        """Write the cache and the prompt to `path` (safetensors, engine/snapshot.py); returns its size."""
        extra = {"kind": "document", "prefix_ids": self.prompt.prefix_ids, "suffix_ids": self.prompt.suffix_ids,
                 "input_tokens": self.input_tokens}
        return save_snapshot(path, self.runner.cache, self.lm, self.config, extra)

    def close(self) -> None:
        """Give the model its own attention back (the document answers no more)."""
        self.runner.close()

    def __enter__(self) -> "Document":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read(lm: LoadedModel, text: Text, config: CacheConfig = CacheConfig(), prompt: Prompt | None = None,
         max_tokens: int = 256) -> Document:
    """Read `prompt`'s pinned prefix and then `text` through `config`'s cache, once (room is checked first for
    the prompt's request and `max_tokens` of answer)."""
    prompt = prompt if prompt is not None else summary_prompt(lm)
    n_sinks = max(config.sinks, len(prompt.prefix_ids))
    pieces, known = token_ids(lm, text), None
    if config.policy == "full":  # positions grow with the input: count it first
        ids = [i for piece in pieces for i in piece]
        pieces, known = [ids], len(prompt.prefix_ids) + len(ids)
    check_room(config, n_sinks, lm.max_positions, len(prompt.suffix_ids), max_tokens, known)
    runner = Runner(lm.model, config, n_sinks=n_sinks,
                    expected_tokens=(known or 0) + len(prompt.suffix_ids) + max_tokens if known else 0)
    done = 0
    try:
        for done in ingest_steps(runner, prompt.prefix_ids, pieces):
            pass
    except BaseException:
        runner.close()
        raise
    return Document(lm, runner, prompt, done)


def load(lm: LoadedModel, path: str) -> Document:
    """A Document from a file `Document.save` wrote for this model (its cache settings come from the file)."""
    def inspect(meta: dict) -> None:
        if not isinstance(meta.get("extra"), dict) or meta["extra"].get("kind") != "document":
            raise CascadeError(f"{path} was not written by Document.save")

    snap = load_snapshot(path, lm, inspect=inspect)
    extra = snap.meta["extra"]
    try:
        prompt = Prompt([int(i) for i in extra["prefix_ids"]], [int(i) for i in extra["suffix_ids"]])
        n_input = int(extra["input_tokens"])
    except (KeyError, TypeError, ValueError):
        raise CascadeError(f"{path} is not a usable document file (no prompt)") from None
    runner = Runner(lm.model, config_of(snap.meta), n_sinks=snap.meta["n_sinks"])
    runner.replace_cache(snap.cache)
    return Document(lm, runner, prompt, n_input)


def summarize(lm: LoadedModel, text: Text, config: CacheConfig = CacheConfig(), words: int | None = None,
              max_tokens: int = 256, sampling: Sampling = GREEDY) -> str:
    """A summary of `text`, read once through `config`'s cache."""
    with read(lm, text, config, summary_prompt(lm, words), max_tokens) as doc:
        return doc.answer(max_tokens=max_tokens, sampling=sampling)


def ask(lm: LoadedModel, text: Text, question: str, config: CacheConfig = CacheConfig(), max_tokens: int = 256,
        sampling: Sampling = GREEDY) -> str:
    """The answer to `question` about `text`, read once with the question pinned before it."""
    with read(lm, text, config, ask_prompt(lm, question), max_tokens) as doc:
        return doc.answer(max_tokens=max_tokens, sampling=sampling)
