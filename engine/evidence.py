"""Evidence spans for `ask`: while the input streams, keep whole passages that the question points at.

The cascade cannot keep a fact stated once far back (it thins every run of consecutive tokens past sub-cache 0),
so when the question is known before the input, a selector picks spans of consecutive tokens and an evidence
store (engine/cache/evidence.py) keeps them whole, inside the cache's memory.

Which tokens the question points at. Position is taken out: each layer's *pre-RoPE* queries of the pinned
prompt meet the chunk's *pre-RoPE* keys, with a softmax over the chunk's own L keys. The question's attention is
set against the attention of the rest of the prompt (chat header and instruction, the *control*), so that keys
every query looks at (the first token, punctuation, names) do not count as evidence:

    a(t) = L · mean_q softmax_t(q · k(t) · scale)          (attention relative to uniform, over some queries)
    rel_l(t) = max over heads of  a_question(t) / (a_control(t) + EPS)

and the layers that retrieve are weighed in: rel(t) = Σ_l w_l rel_l(t). Which layers those are is measured on the
model itself (`calibrate`: synthetic facts in the bundled filler, the layers that rank the fact highest), cached
per model file, never downloaded. Measured on the embedded model (docs/RESULTS.md, "Evidence spans"): without the
control the planted fact of a prose chapter ranked 8th-29th; with it, 1st.

Spans. After every chunk, each of its tokens p proposes the span [p - BEFORE, p - BEFORE + width) (centred: a
fact's strongest tokens fall on what names it, before its value, or on the end of its sentence, after it),
scored by the sum of the TOP_TOKENS largest rel inside it (`window_scores`), strongest first. The store has
`slots // width` span slots; a proposal takes a free slot, or the weakest span's when it is stronger, and
never overlaps a span as strong as itself (which it then replaces). Every layer keeps the same spans, so a
span is a piece of text: `spans()` gives them with their scores for citations."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .cache.evidence import EvidenceCascadeCache
from .prompt import quote_ids
from .retention import QuestionGuide
from .runner import Runner

SPAN = 32  # tokens per span (decided by measurement: docs/RESULTS.md, "Evidence spans")
BEFORE = 16  # of which before the peak: the peak often falls at the end of the fact's sentence
EPS = 0.3  # the control's floor in rel_l, in units of uniform attention (chosen on the probe of docs/RESULTS.md)
SHARE = 8  # default budget: cache_size // SHARE slots, rounded down to whole spans
TOP_LAYERS = 6  # layers weighed in after calibration
TOP_TOKENS = 4  # a span's score: the sum of its 4 strongest tokens' rel (window_scores)
QUOTE = 8  # kept spans quoted before the question once the cache evicted (quoted_closing; ask --quote)


def default_slots(cache_size: int, cascades: int, width: int = SPAN) -> int:
    """The default evidence budget for a cache of `cache_size`: about 1/SHARE of it in whole spans, such that
    what is left for the cascade is a positive multiple of `cascades`."""
    slots = (cache_size // SHARE) // width * width
    while slots > 0 and (cache_size - slots < cascades or (cache_size - slots) % cascades):
        slots -= width
    return max(slots, 0)


def relevance(question: Tensor, control: Tensor | None, k: Tensor, scale: float) -> Tensor:
    """rel_l of the module docstring for one layer: question [B, Hq, Q, D] and control [B, Hq, C, D] pre-RoPE
    queries (float32), the chunk's pre-RoPE keys k [B, Hkv, L, D]; returns [L] float32 (batch row 0)."""
    n = k.shape[2]
    kt = k.float().transpose(-1, -2)

    def attention(q: Tensor) -> Tensor:  # [Hkv, G, L]: L · the softmax over the chunk, averaged over the queries
        b, hq, n_q, d = q.shape
        hkv = k.shape[1]
        s = q.reshape(b, hkv, hq // hkv * n_q, d) @ kt * scale
        return torch.softmax(s, dim=-1).view(b, hkv, hq // hkv, n_q, n).mean(dim=3)[0] * n

    a = attention(question)
    floor = attention(control) + EPS if control is not None and control.shape[2] else torch.full_like(a, 1 + EPS)
    return (a / floor).amax(dim=1).amax(dim=0)


def window_scores(rel: np.ndarray, before: int, width: int, top: int = TOP_TOKENS) -> np.ndarray:
    """Per token i of a chunk, the score of the span it proposes: the sum of the `top` largest rel over
    [i - before, i - before + width) within the chunk. A fact shares several words with its question, while a
    lone token that happens to draw the question's attention makes one strong peak (measured in
    docs/RESULTS.md, "Evidence spans": a planted fact's span ranked 8th by its peak and 1st by its top 4)."""
    n = len(rel)
    padded = np.concatenate([np.zeros(before), rel, np.zeros(width)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)[:n]
    top = min(top, width)
    return np.partition(windows, width - top, axis=1)[:, width - top:].sum(axis=1)


@dataclass(frozen=True)
class Span:
    start: int  # stream index of the first token
    end: int  # one past the last
    score: float
    peak: int  # the token that proposed it
    ids: tuple[int, ...]  # the span's token ids, as far as they were read


class EvidenceSelector:
    """Hooks on a Runner whose cache is an EvidenceCascadeCache, as a context manager around the input:

        with guide, EvidenceSelector(runner, guide, weights, input_start=len(prefix_ids)):
            ingest(runner, prefix_ids, pieces)

    `guide` captures the question's queries (its weight may be 0), or is a `Probed` question whose queries were
    taken beforehand (`probe`); then `part` = (k, n) gives this selector the k-th of n equal shares of the store,
    for several questions over one ingest (`Selectors`). The selector's state lives in the cache (`cache.state`),
    so saving the cache saves it and resuming from a checkpoint goes on where it stopped."""

    def __init__(self, runner: Runner, guide: QuestionGuide | Probed, weights: dict[int, float], input_start: int,
                 width: int = SPAN, before: int = BEFORE, part: tuple[int, int] | None = None):
        cache = runner.cache
        assert isinstance(cache, EvidenceCascadeCache), type(cache)
        share = cache.evidence // part[1] if part else cache.evidence
        width = min(width, share)  # a store smaller than one span holds one shorter span
        before = min(before, width // 2)
        self.runner, self.guide, self.weights = runner, guide, dict(weights)
        self.input_start, self.width, self.before = input_start, width, before
        self.n_spans = share // width
        self.first = part[0] * self.n_spans if part else 0  # this selector's first span slot in the store
        self.key = f".{part[0]}" if part else ""  # its keys in cache.state
        self.scale = [float(layer.self_attn.scaling) for layer in runner.model.model.layers]
        # pre-RoPE queries of the prompt around the question (not its first token), per layer: the control
        self.control: list[Tensor | None] = (list(guide.control) if isinstance(guide, Probed)
                                             else [None] * len(self.scale))
        self._parts: list[list[Tensor]] = [[] for _ in self.scale]
        self._outer = None  # the guide's query hook, called first
        self._rel: Tensor | None = None
        state = cache.state
        if part:
            state["parts"] = [part[1], self.n_spans, width]  # what `restrict` and `kept_spans` read
        state.setdefault("spans" + self.key, [None] * self.n_spans)  # [start, end, score, peak, ids] per span
        state.setdefault("recent" + self.key, [0, []])  # [stream index of recent[1][0], the last `before` ids]
        self.spans: list = state["spans" + self.key]

    def __enter__(self) -> "EvidenceSelector":
        self._outer = self.runner.query_hook
        self.runner.query_hook = self.capture
        self.runner.key_hook, self.runner.after_step = self.score_keys, self.after_step
        return self

    def __exit__(self, *exc) -> None:
        self.runner.key_hook = self.runner.after_step = None
        self.runner.query_hook = self._outer
        self.finish()

    def finish(self) -> None:
        """The input ends here: nothing of the request or the answer is evidence."""
        cache = self.runner.cache
        self.spans = cache.state["spans" + self.key]  # a resumed cache brings its own state
        end = cache.seen
        for j, span in enumerate(self.spans):
            if span is not None and span[1] > end:
                span[1] = end
                for slot in self._slots(j):
                    want = cache.wanted.get(slot)
                    if want is not None and want >= end:
                        cache.release(slot)

    def _slots(self, j: int) -> range:
        """Evidence slots of this selector's span slot j."""
        return range((self.first + j) * self.width, (self.first + j + 1) * self.width)

    # ---- hooks

    def capture(self, layer: int, q: Tensor) -> None:
        """query_hook: the guide's capture, then the control's rows of the prompt's pre-RoPE queries q."""
        if self._outer is not None:
            self._outer(layer, q)
        if self.control[layer] is not None:
            return
        t0, n = self.runner.cache.seen, q.shape[2]
        rows = [t - t0 for t in range(max(t0, 1), min(t0 + n, self.input_start))
                if not self.guide.start <= t < self.guide.end]
        if rows:
            self._parts[layer].append(q[:, :, rows].float().clone())
        if t0 + n >= self.input_start:
            parts = self._parts[layer]
            self.control[layer] = torch.cat(parts, dim=2) if parts else q[:, :, :0].float()
            self._parts[layer] = []

    def score_keys(self, layer: int, k: Tensor) -> None:
        """key_hook: add layer `layer`'s content-only question attention over the chunk's pre-RoPE keys k."""
        w = self.weights.get(layer)
        q = self.guide.queries[layer]
        cache = self.runner.cache
        if not w or q is None or cache.seen < max(getattr(self.guide, "end", 0), self.input_start):
            return
        p = relevance(q, self.control[layer], k, self.scale[layer]) * w
        self._rel = p if self._rel is None else self._rel + p.to(self._rel.device)

    def after_step(self, ids: Tensor) -> None:
        """after_step: propose spans from the chunk just committed (ids [1, L])."""
        rel, self._rel = self._rel, None
        cache = self.runner.cache
        chunk = ids[0].tolist()
        t0 = cache.seen - len(chunk)
        self._extend(t0, chunk)
        if rel is not None:
            self._propose(t0, rel.float().cpu().numpy(), chunk)
        recent_start, recent = cache.state["recent" + self.key]
        recent = (recent + chunk)[-self.before:] if self.before else []
        cache.state["recent" + self.key] = [cache.seen - len(recent), recent]

    # ---- spans

    def _extend(self, t0: int, chunk: list[int]) -> None:
        """Append this chunk's ids to the spans that reach into it."""
        self.spans = self.runner.cache.state["spans" + self.key]  # a resumed cache brings its own state
        for span in self.spans:
            if span is None:
                continue
            have = span[0] + len(span[4])
            lo, hi = max(have, t0), min(span[1], t0 + len(chunk))
            if lo == have and lo < hi:
                span[4].extend(chunk[lo - t0 : hi - t0])

    def _propose(self, t0: int, rel: np.ndarray, chunk: list[int]) -> None:
        cache = self.runner.cache
        spans = self.spans
        oldest = self.input_start if cache.fifo else max(self.input_start, cache.seen - cache.count[0])
        recent_start, recent = cache.state["recent" + self.key]
        known = {recent_start + n: x for n, x in enumerate(recent)} | {t0 + n: x for n, x in enumerate(chunk)}
        scores = window_scores(rel, self.before, self.width)
        # windows that hold the same strongest tokens tie: the one centred on the strongest token wins, so that
        # what follows a fact's name (its value) stays inside
        for i in np.lexsort((-rel, -scores)):
            score, peak = float(scores[i]), t0 + int(i)
            if peak <= self.input_start:  # the input's first token draws attention like a sink does: no fact
                continue
            weakest = min(range(self.n_spans), key=lambda j: -1.0 if spans[j] is None else spans[j][2])
            if spans[weakest] is not None and spans[weakest][2] >= score:
                break  # sorted: no later peak can win a slot
            start = max(peak - self.before, oldest)
            end = start + self.width
            hit = [j for j, s in enumerate(spans) if s is not None and s[0] < end and start < s[1]]
            if any(spans[j][2] >= score for j in hit):
                continue
            for j in hit:
                self._drop(j)
            free = [j for j, s in enumerate(spans) if s is None]
            j = free[0] if free else weakest
            if spans[j] is not None:
                self._drop(j)
            ids = []
            for t in range(start, min(end, t0 + len(chunk))):
                if t not in known:
                    break
                ids.append(known[t])
            spans[j] = [start, end, score, peak, ids]
            for slot, t in zip(self._slots(j), range(start, end)):
                cache.take(slot, t)

    def _drop(self, j: int) -> None:
        cache = self.runner.cache
        self.spans[j] = None
        for slot in self._slots(j):
            cache.release(slot)


def kept_spans(cache: EvidenceCascadeCache, question: int | None = None) -> list[Span]:
    """The spans the store holds (at least one token taken or still wanted), strongest first: those of the
    `question`-th of several questions (`Selectors`), or of the one question."""
    held = set(cache.held().tolist())
    wanted = set(cache.wanted.values())
    out = []
    for span in cache.state.get("spans" if question is None else f"spans.{question}", []):
        if span is None:
            continue
        start, end, score, peak, ids = span
        kept = [t for t in range(start, end) if t in wanted or t in held]
        if kept:
            out.append(Span(int(kept[0]), int(kept[-1]) + 1, float(score), int(peak),
                            tuple(ids[kept[0] - start : kept[-1] + 1 - start])))
    return sorted(out, key=lambda s: (-s.score, s.start))


def quoted_closing(cache, tokenizer, suffix_ids: list[int], most: int, max_tokens: int,
                   question: int | None = None) -> tuple[list[int], int]:
    """(ids, n): the closing request `suffix_ids` with the `n` strongest kept spans quoted before it
    (engine/prompt.py `quote_ids`; of the `question`-th share when several), at most `most`, as many as fit the
    newest sub-cache together with `max_tokens`; `suffix_ids` alone (n = 0) when the cache evicted nothing (the
    whole input is still there) or there is no store."""
    if most <= 0 or not isinstance(cache, EvidenceCascadeCache) or cache.n_evidence == 0:
        return suffix_ids, 0
    spans = kept_spans(cache, question)[:most]
    newest = cache.cache_size // cache.cascades
    while spans:
        ids = quote_ids(tokenizer, [tokenizer.decode(list(s.ids), skip_special_tokens=True)
                                    for s in reversed(spans)]) + suffix_ids
        if len(ids) + max_tokens <= newest:
            return ids, len(spans)
        spans.pop()  # the weakest first
    return suffix_ids, 0


# ------------------------------------------------------------------------------ several questions, one ingest

@dataclass(frozen=True)
class Probed:
    """A question's pre-RoPE queries and its control, per layer, taken by `probe` before the input is read."""

    queries: tuple[Tensor, ...]  # [B, Hq, Q, D] float32
    control: tuple[Tensor, ...]  # [B, Hq, C, D] float32


def probe(model, prompt) -> Probed:
    """Run `prompt`'s pinned prefix (the question first, `engine/prompt.py`) alone through the model and keep the
    queries a pinned read would have captured: the question's rows, and the rest but the first token (the
    control). The same numbers as question-first `ask` captures while reading, without pinning the question, so
    that several questions can share one question-agnostic ingest."""
    from .config import CacheConfig

    ids = list(prompt.prefix_ids)
    start, end = prompt.question_span
    n_layers = len(model.model.layers)
    seen: list[Tensor | None] = [None] * n_layers

    def keep(layer: int, q: Tensor) -> None:
        seen[layer] = q.float().clone()

    runner = Runner(model, CacheConfig(policy="full", stride=len(ids)), n_sinks=0, expected_tokens=len(ids))
    runner.query_hook = keep
    device = next(model.parameters()).device
    with runner, torch.inference_mode():
        runner.step(torch.tensor([ids], device=device))
    rows = [t for t in range(1, len(ids)) if not start <= t < end]
    return Probed(tuple(q[:, :, start:end] for q in seen), tuple(q[:, :, rows] for q in seen))


def split_slots(evidence: int, questions: int, width: int = SPAN) -> int:
    """Slots of a store of `evidence` that `questions` equal shares of whole spans use (at least one span each)."""
    spans = max(1, evidence // width // questions)
    return spans * width * questions


class Selectors:
    """One EvidenceSelector per question (`part` k of n), as one set of hooks on the runner:

        with Selectors([EvidenceSelector(runner, probe(model, p), w, n_prefix, part=(k, n)) for k, p in ...]):
            ingest(runner, prefix_ids, pieces)

    The cascade stays question-agnostic; question k's spans fill its share of the store. A token that two
    questions both point at is held once, in the share of whichever took it first (`restrict` keeps it for
    both)."""

    def __init__(self, selectors: list[EvidenceSelector]):
        self.selectors = selectors
        self.runner = selectors[0].runner

    def __enter__(self) -> "Selectors":
        self.runner.key_hook, self.runner.after_step = self.score_keys, self.after_step
        return self

    def __exit__(self, *exc) -> None:
        self.runner.key_hook = self.runner.after_step = None
        for selector in self.selectors:
            selector.finish()

    def score_keys(self, layer: int, k: Tensor) -> None:
        for selector in self.selectors:
            selector.score_keys(layer, k)

    def after_step(self, ids: Tensor) -> None:
        for selector in self.selectors:
            selector.after_step(ids)


def others_evidence(cache, question: int) -> list[int]:
    """The store slots that the `question`-th of several questions does not see: every other share's tokens that
    none of this question's spans covers, and every other share's pending takes. [] for one question's store, or
    for a cache without one."""
    parts = getattr(cache, "state", {}).get("parts")
    if not parts:
        return []
    _, n_spans, width = parts
    mine = range(question * n_spans * width, (question + 1) * n_spans * width)
    covered = [(s[0], s[1]) for s in cache.state.get(f"spans.{question}", []) if s is not None]
    held = [slot for slot, t in enumerate(cache.held().tolist())
            if slot not in mine and t >= 0 and not any(a <= t < b for a, b in covered)]
    return held + [slot for slot in cache.wanted if slot not in mine and slot not in held]


def restrict(cache: EvidenceCascadeCache, question: int) -> None:
    """Leave in `cache` (a copy made to answer one question) only the evidence of the `question`-th of several
    (`others_evidence` released)."""
    for slot in others_evidence(cache, question):
        cache.release(slot)


# ---------------------------------------------------------------------------------------------- calibration

CALIBRATION_VERSION = 2
_FACTS = (  # (statement, question): a value named once, asked for by its name
    ("The blue lantern is kept in room {n}.", "In which room is the blue lantern kept?"),
    ("The ferry to the island leaves from pier {n}.", "From which pier does the ferry to the island leave?"),
    ("Our old teacher was born in the year {n}.", "In which year was our old teacher born?"),
    ("The locker of the night guard has the number {n}.", "What is the number of the night guard's locker?"),
)


def calibrate(model, tokenizer, tokens: int = 1024, stride: int = 256, seed: int = 0) -> dict[int, float]:
    """Weights of the layers whose `relevance` finds a planted fact (ranked best by the median rank of the fact
    over a few synthetic samples); the TOP_LAYERS best get weight 1. The prompt must fit one chunk of `stride`."""
    import random

    from .bench.text import Noise
    from .config import CacheConfig
    from .prompt import build_prompt
    from .reading import ingest

    n_layers = len(model.model.layers)
    tokens = min(tokens, int(getattr(model.config, "max_position_embeddings", tokens)))
    filler = Noise(tokenizer)
    ranks: list[list[int]] = [[] for _ in range(n_layers)]
    rng = random.Random(f"calibrate:{seed}")
    for statement, question in _FACTS:
        fact = list(tokenizer.encode(" " + statement.format(n=rng.randrange(100, 1000)), add_special_tokens=False))
        frame = build_prompt(tokenizer, "Answer the question using the document.", "Answer.", question,
                             question_first=True)
        body = filler.tokens(rng, tokens - len(frame.prefix_ids) - len(fact))
        at = rng.randrange(len(body) // 8, len(body) * 7 // 8)
        doc = body[:at] + fact + body[at:]
        config = CacheConfig(policy="full", stride=stride)
        rels: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
        n0 = len(frame.prefix_ids)
        qa, qb = frame.question_span
        others = [i for i in range(1, n0) if not qa <= i < qb]
        prompt: dict[int, Tensor] = {}
        scale = [float(layer.self_attn.scaling) for layer in model.model.layers]
        with Runner(model, config, n_sinks=n0, expected_tokens=n0 + len(doc)) as runner:

            def queries(layer: int, q: Tensor) -> None:
                if runner.cache.seen == 0:  # the prompt, read as one chunk (stride >= its length)
                    prompt[layer] = q.float().clone()

            def keys(layer: int, k: Tensor) -> None:
                if runner.cache.seen >= n0:
                    q = prompt[layer]
                    rels[layer].append(relevance(q[:, :, qa:qb], q[:, :, others], k, scale[layer]).cpu().numpy())

            runner.query_hook, runner.key_hook = queries, keys
            ingest(runner, frame.prefix_ids, [doc])
        for layer in range(n_layers):
            r = np.concatenate(rels[layer])
            ranks[layer].append(int((r > r[at : at + len(fact)].max()).sum()) + 1)
    order = sorted(range(n_layers), key=lambda l: (float(np.median(ranks[l])), max(ranks[l]), l))
    return {l: 1.0 for l in order[:TOP_LAYERS]}


def retrieval_layers(lm, home: str | os.PathLike | None = None) -> dict[int, float]:
    """`calibrate` for a loaded model (engine.models.LoadedModel), cached in $CASCADECTL_HOME/calibration by
    the model's file hash: the first `ask` with a model pays a few seconds, later ones read a small file."""
    root = Path(home or os.environ.get("CASCADECTL_HOME") or Path.home() / ".cache" / "cascadectl") / "calibration"
    path = root / f"{lm.model_hash[:32]}-{str(lm.dtype).removeprefix('torch.')}-v{CALIBRATION_VERSION}.json"
    try:
        data = json.loads(path.read_text())
        weights = {int(k): float(v) for k, v in data["weights"].items()}
        if weights and all(0 <= k < len(lm.model.model.layers) for k in weights):
            return weights
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    weights = calibrate(lm.model, lm.tokenizer)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"model": lm.model_id, "weights": {str(k): v for k, v in weights.items()}}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: calibrate again next time
    return weights
