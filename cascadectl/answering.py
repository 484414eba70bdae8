"""What `summarize` and `ask` share: read the input once with progress, stream answers, print stats and reports.

A `Session` owns the runner for one input: `read()` streams the pinned prefix and the input through the cache
(cascadectl/driver.py: progress on stderr; checkpoints and resume with `--checkpoint`), or `load()` takes the
cache from a `--save-cache` file instead (the file itself: cascadectl/cache_files.py); `save()` writes that
file; `answer()` appends a closing request and streams the answer to stdout, `finish()` prints the stats line,
the retention report and/or the JSON document (cascadectl/run_report.py)."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict

from rich.markup import escape

from engine.checkpoint import ids_sha256
from engine.config import CacheConfig
from engine.errors import CascadeError
from engine.generate import Sampling
from engine.prompt import Prompt
from engine.batch_answer import answer_together, frozen_batch, frozen_refusal
from engine.evidence import (EvidenceSelector, Selectors, default_slots, others_evidence, probe, quoted_closing,
                             restrict, retrieval_layers, split_slots)
from engine.retention import QuestionGuide
from engine.retention_report import SourceMap, retention_report
from engine.runner import Runner
from engine.reading import answer, check_room, forked, ingest_steps, stop_ids
from engine.sizing import long_input_config, route
from engine.tokens import rechunk

from . import cache_files
from . import checkpoints as ck
from .common import AnswerInterrupts, require_text, versions
from .citations import evidence_fill, evidence_records, print_citations
from .console import Say, fill_text
from .driver import InputTokens, drive, read_all
from .inputs import InputReport
from .run_report import Stats, print_report
from .settings import AutoSize



class Session:
    """One input read once through one runner; answers come from that cache (or copies of it)."""

    def __init__(self, lm, config: CacheConfig, sources: list[str], prompt: Prompt, max_tokens: int,
                 quiet: bool = False, question_weight: float = 0.0, evidence: int | None = 0,
                 sizing: AutoSize | None = None, probes: list[Prompt] | None = None, frozen: bool = False):
        """`evidence`: slots for the question's spans (None: the default share of the cache); `sizing`: given
        for --cache-size auto, which sizes `config` to the model here and reads an input that fits exactly;
        `probes`: the questions, each as a question-first prompt, when they are known but not pinned (several
        -q, or one with --save-cache): each gets its share of the evidence store (engine/evidence.py); `frozen`:
        the answers are meant to come from the frozen cache (`answer_together`), which the requests cannot evict:
        the warning that the request may be evicted while answering is then held back until an answer takes the
        evicting cache after all (`answer`)."""
        self.lm, self.config, self.sources, self.prompt, self.quiet = lm, config, sources, prompt, quiet
        self.max_tokens, self.question_weight, self.frozen = max_tokens, question_weight, frozen
        self.held_warning: str | None = None  # check_room's, while the answers are meant to be frozen
        self.guided = prompt.question_span is not None and question_weight > 0 and config.policy == "cascade"
        self.n_sinks = max(config.sinks, len(prompt.prefix_ids))
        self.sizing = None
        if sizing is not None and config.policy != "full":
            q_tokens = prompt.question_span[1] - prompt.question_span[0] if self.guided else 0
            config, self.sizing = long_input_config(config, lm.model, lm.max_positions, self.n_sinks, q_tokens,
                                                    sizing.budget(lm.device), sizing.stride)
            self.config = config
        self.probes = list(probes or []) if config.policy == "cascade" else []
        questioned = (prompt.question_span is not None or self.probes) and config.policy == "cascade"
        if evidence is None:
            evidence = default_slots(config.cache_size, config.cascades) if questioned else 0
        if evidence and self.probes:
            evidence = split_slots(evidence, len(self.probes))
        if evidence and questioned:
            self.config = config.with_evidence(evidence)  # the stride at most one sub-cache: record.settings
        self.evidence: list[dict] = []  # the kept spans, for citations (evidence_records)
        self.evidence_by_question: list[list[dict]] | None = None  # with probes: question k's spans
        self._store_index: list[int | None] | None = None  # question asked -> its share of the store
        self.input = InputReport()
        self.source_map = SourceMap()
        self.stats = Stats()
        self.retention: dict = {}
        self.runner: Runner | None = None
        self.loaded: dict | None = None  # the --load-cache file's record of its ingest
        self._checkpoint = None  # engine.checkpoint.Checkpoint of this read, removed by finish()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.runner is not None:
            self.runner.close()
        if exc_type is KeyboardInterrupt:  # partial statistics, then handle_errors exits with 130
            Say.info(f"[dim]{self.stats.line()}[/]")

    def read(self, longest_suffix: int, checkpoint: ck.CheckpointOptions | None = None, command: str = "") -> None:
        """Check positions, then stream prefix and input through a fresh runner, with progress on stderr.

        With `checkpoint` (a path), the ingest is saved every so often and on Ctrl-C, or resumed from the file
        (`command` names the run in it); Ctrl-C always lands between chunks."""
        tokens = InputTokens(self.lm.tokenizer, self.sources, self.input, self.source_map)
        pieces = tokens.pieces
        n_prefix = len(self.prompt.prefix_ids)
        known = None
        if self.sizing is not None:  # --cache-size auto: an input that fits is read exactly
            self.config, self.sizing, pieces = route(pieces, self.config, self.sizing, self.lm.model,
                                                     self.lm.max_positions,
                                                     n_prefix + longest_suffix + self.max_tokens)
            self.guided = self.guided and not self.sizing.exact
        if self.config.policy == "full":  # positions grow with the input: count it before any model work
            ids = read_all(pieces)
            pieces, known = [ids], len(ids)
        q_tokens = self.prompt.question_span[1] - self.prompt.question_span[0] if self.guided else 0
        warning = check_room(self.config, self.n_sinks, self.lm.max_positions, longest_suffix, self.max_tokens,
                             None if known is None else n_prefix + known, q_tokens)
        if self.sizing is not None:
            Say.info(f"[dim]{self.sizing.describe()}[/]")
        self._room_warning(warning)
        expected = n_prefix + (known or 0) + longest_suffix + self.max_tokens if known is not None else 0
        self.runner = Runner(self.lm.model, self.config, n_sinks=self.n_sinks, expected_tokens=expected)
        keeps = self.config.evidence > 0
        probed = keeps and bool(self.probes)  # several questions, not pinned: queries probed beforehand
        guide = (QuestionGuide(self.runner, self.prompt.question_span, self.question_weight if self.guided else 0.0)
                 if self.guided or (keeps and not probed) else None)
        if probed:
            layers, n = retrieval_layers(self.lm), len(self.probes)
            selector = Selectors([EvidenceSelector(self.runner, probe(self.lm.model, p), layers, n_prefix,
                                                   part=(k, n)) for k, p in enumerate(self.probes)])
        else:
            selector = (EvidenceSelector(self.runner, guide, retrieval_layers(self.lm), n_prefix) if keeps
                        else contextlib.nullcontext())
        keeps = keeps and not probed  # below: the one pinned question's queries, saved in checkpoints
        ckpt = self._checkpoint = ck.for_run(  # resuming needs the same pinned prompt and question weight
            checkpoint or ck.CheckpointOptions(None), self.lm, self.config, command,
            {"prefix_sha256": ids_sha256(self.prompt.prefix_ids), "question_weight": self.question_weight,
             **({"questions_sha256": ids_sha256([t for p in self.probes for t in p.prefix_ids])} if probed else {})},
            {"prefix_sha256": "instruction or question before the input", "question_weight": "--question-weight",
             "questions_sha256": "the -q questions (each has its evidence)"})
        resume_at, seconds_before = None, 0.0
        if ckpt is not None:
            if checkpoint.resume:
                resume_at, seconds_before = self._resume(ckpt, guide, selector if keeps else None)
            pieces = ckpt.track(rechunk(ckpt.skip(pieces), self.config.stride))
        start = time.perf_counter() - seconds_before

        def save() -> int:
            queries = {f"question.{l}": q for l, q in enumerate(guide.queries) if q is not None} if guide else {}
            if keeps:
                queries |= {f"control.{l}": c for l, c in enumerate(selector.control) if c is not None}
            return ckpt.save(self.runner.cache, {"seconds_ingest": time.perf_counter() - start}, queries)

        def on_step(done: int) -> None:
            self.stats.tokens, self.stats.seconds_ingest = done, time.perf_counter() - start

        with guide if guide is not None else contextlib.nullcontext(), selector:
            n_input = drive(ingest_steps(self.runner, self.prompt.prefix_ids, pieces, resume_at), "reading",
                            self.quiet, known, tokens.estimate_total,
                            fill=lambda: fill_text(self.runner.cache.fill(), evidence_fill(self.runner.cache)),
                            ckpt=ckpt, save=save, partial=lambda done: f"interrupted after {done:,} input tokens",
                            on_step=on_step) or (resume_at or 0)
        require_text(self.input, self.sources, n_input)  # nothing to answer from: refuse before generating
        Say.skipped(self.input.skipped)
        if ckpt is not None and ckpt.ledger.count > ckpt.saved_at:  # a Ctrl-C while answering resumes here
            save()
        self.stats.tokens, self.stats.seconds_ingest = n_input, time.perf_counter() - start
        self.stats.kv_cache_bytes = self.runner.cache.nbytes()
        if probed:
            self._store_index = list(range(len(self.probes)))
        self._records(n_prefix, self.source_map, self._store_index)
        self.retention = {
            "question_guided": self.guided,
            "question_weight": self.question_weight if self.guided else 0.0,
            **retention_report(self.runner.cache, n_prefix, n_input, self.source_map),
        }

    def _resume(self, ckpt, guide: QuestionGuide | None, selector: EvidenceSelector | None) -> tuple[int, float]:
        """Put the checkpoint's cache (and the question's queries) in place; (input tokens done, seconds spent)."""
        snap = ckpt.load()
        self.runner.replace_cache(snap.cache)
        device = next(self.runner.model.parameters()).device
        for name, holder in (("question", guide and guide.queries), ("control", selector and selector.control)):
            if not holder:
                continue
            queries = [snap.extra_tensors.get(f"{name}.{l}") for l in range(len(holder))]
            if any(q is None for q in queries):
                raise CascadeError(f"{ckpt.path} holds no {name} queries; start over without --resume")
            holder[:] = [q.to(device) for q in queries]
        seconds = snap.meta["extra"]["state"].get("seconds_ingest", 0.0)
        return ckpt.resume_at, float(seconds) if isinstance(seconds, (int, float)) else 0.0

    def _records(self, n_prefix: int, source_map: SourceMap, questions: list[int | None] | None = None) -> None:
        """Citations from the cache: of the one question (`questions` None), or of each of several, `questions[i]`
        being the i-th asked question's share of the store (None: it has none)."""
        cache = self.runner.cache
        if questions is None:
            self.evidence = evidence_records(cache, n_prefix, source_map, self.lm.tokenizer)
            return
        self.evidence_by_question = [[] if k is None else
                                     evidence_records(cache, n_prefix, source_map, self.lm.tokenizer, k)
                                     for k in questions]
        for i, records in enumerate(self.evidence_by_question):
            for r in records:
                r["question"] = i
        self.evidence = [r for records in self.evidence_by_question for r in records]  # the same records

    def evidence_for(self, i: int) -> list[dict]:
        """The citations of the i-th question asked."""
        if self.evidence_by_question is None:
            return self.evidence if i == 0 else []
        return self.evidence_by_question[i] if i < len(self.evidence_by_question) else []

    def closing(self, i: int, suffix_ids: list[int], most: int) -> list[int]:
        """The ids that close the i-th question: `suffix_ids` with its `most` strongest passages quoted before
        it when the cache evicted anything (engine/evidence.py `quoted_closing`); the records of the quoted
        passages get `quoted: true`, the others `false`."""
        ids, n = quoted_closing(self.runner.cache, self.lm.tokenizer, suffix_ids, most, self.max_tokens,
                                self.store_index(i))
        for rank, r in enumerate(self.evidence_for(i)):  # strongest first, as kept_spans orders them
            r["quoted"] = rank < n
        return ids

    def store_index(self, i: int) -> int | None:
        """The i-th question's share of a several-question store, or None (one question, or none)."""
        return self._store_index[i] if self._store_index is not None and i < len(self._store_index) else None

    def save(self, path: str, pinned_question: str | None = None, questions: list[str] = ()) -> None:
        """Write the ingested cache and what answering from it later needs (`--save-cache`).

        `pinned_question`: the question read before the input, when there was one; the file then answers only
        that question (the cache kept what it asked about). `questions`: the probed questions whose evidence
        the store holds, in order (the file answers any question; these with their evidence)."""
        cache_files.save(path, self.runner.cache, self.lm, self.config, cache_files.IngestRecord(
            prompt=self.prompt, pinned_question=pinned_question,
            evidence_questions=list(questions) if self._store_index is not None else [],
            input_tokens=self.stats.tokens, seconds_ingest=self.stats.seconds_ingest, input=self._input_record(),
            source_map=self.source_map, retention=self.retention))

    def load(self, path: str, explicit: dict, longest_suffix: int, questions: list[str] = ()) -> None:
        """Take the cache from a `--save-cache` file instead of reading an input (`explicit`: settings given on
        the command line, which must agree with the file's)."""
        start = time.perf_counter()
        saved = cache_files.load(path, self.lm, explicit, questions)
        cache = saved.cache
        self.config, self.n_sinks, self.loaded = saved.config, saved.n_sinks, {**saved.input, "cache_file": path}
        warning = check_room(self.config, self.n_sinks, self.lm.max_positions, longest_suffix, self.max_tokens,
                             cache.seen if self.config.policy == "full" else None)
        self._room_warning(warning)
        self.runner = Runner(self.lm.model, self.config, n_sinks=self.n_sinks)
        self.runner.replace_cache(cache)
        self.retention = saved.retention
        stored = saved.evidence_questions
        if evidence_fill(cache) is None:
            if questions:
                Say.info(f"[dim]note: {escape(path)} holds no evidence spans (read without the question first): "
                         f"a fact stated once far back may be missing from the answer[/]")
        else:
            if stored:
                self._store_index = [stored.index(q) if q in stored else None for q in questions]
                for q, k in zip(questions, self._store_index):
                    if k is None:
                        Say.info(f"[dim]note: {escape(path)} holds no evidence for {escape(repr(q))} (it was read "
                                 f"with other questions): a fact stated once far back may be missing[/]")
            prefix_tokens, source_map = saved.source_map()
            self._records(prefix_tokens, source_map, self._store_index)
        self.stats.tokens, self.stats.loaded_from = saved.input_tokens, path
        self.stats.seconds_ingest = time.perf_counter() - start
        self.stats.kv_cache_bytes = cache.nbytes()

    def _room_warning(self, warning: str | None) -> None:
        """Say check_room's warning now, or hold it while the answers are meant to come from the frozen cache."""
        if warning and self.frozen:
            self.held_warning = warning
        elif warning:
            Say.warn(warning)

    def answer(self, suffix_ids: list[int], sampling: Sampling, echo: bool, fork: bool = False,
               question: int | None = None) -> str:
        """Stream one answer (to stdout when `echo`) through the evicting cache; `fork` answers from a copy of the
        cache, kept for the next. `question`: this question's share of a several-question store (`store_index`),
        whose evidence alone it sees (in a copy)."""
        if self.held_warning:
            Say.warn(self.held_warning)
            self.held_warning = None
        text = []
        seconds_before, start = self.stats.seconds_generate, time.perf_counter()

        def on_token(_: int) -> None:
            self.stats.generated_tokens += 1

        copied = fork or question is not None
        keep = (lambda cache: restrict(cache, question)) if question is not None else None
        try:
            with forked(self.runner, keep) if copied else contextlib.nullcontext(), AnswerInterrupts() as interrupts:
                for piece in answer(self.runner, self.lm.tokenizer, suffix_ids, self.max_tokens, sampling,
                                    stop_ids(self.lm.tokenizer, self.lm.model), on_token):
                    interrupts.check()
                    text.append(piece)
                    if echo:
                        sys.stdout.write(piece)
                        sys.stdout.flush()
                interrupts.check()
        finally:
            self.stats.seconds_generate = time.perf_counter() - start + seconds_before
            if echo:
                sys.stdout.write("\n")
                sys.stdout.flush()
        return "".join(text)

    def answer_one(self, suffix_ids: list[int], sampling: Sampling, echo: bool) -> tuple[str, bool]:
        """One answer (to stdout when `echo`): from the frozen cache where it can come from there
        (`frozen_refusal`), else through the evicting cache after one line on stderr saying why. Returns the text
        and whether it came from the frozen cache."""
        refusal = self.frozen_refusal([suffix_ids])
        if refusal:
            Say.info(f"note: answering from the evicting cache: {refusal}")
            return self.answer(suffix_ids, sampling, echo=echo), False
        return self.answer_together([suffix_ids], sampling, [None] if echo else None)[0], True

    def frozen_refusal(self, suffixes: list[list[int]]) -> str | None:
        """Why the answers to `suffixes` cannot come from the frozen cache (`answer_together`), as the end of a
        note; None: they can (engine/batch_answer.py `frozen_refusal`: one device, the positions, free memory)."""
        return frozen_refusal(self.runner, len(suffixes), self._room(suffixes))

    def _room(self, suffixes: list[list[int]]) -> int:
        """The tail each frozen answer needs: the longest request and `max_tokens`."""
        return max(map(len, suffixes)) + self.max_tokens

    def answer_together(self, suffixes: list[list[int]], sampling: Sampling,
                        echo: list[str | None] | None) -> list[str]:
        """Every question's answer decoded together, one batch per step, from the cache frozen read-only
        (engine/batch_answer.py); question i sees its share of a several-question store only. `echo`: the
        headers to print, one per question, each answer streamed after its own (the first as it is written, the
        others as soon as the ones before them are done; a single answer's header may be None: none printed);
        None: print nothing."""
        n = len(suffixes)
        texts, done = [[] for _ in range(n)], [False] * n
        seconds_before, start = self.stats.seconds_generate, time.perf_counter()
        shown = 0  # the answer being printed

        def on_token(_: int) -> None:
            self.stats.generated_tokens += 1

        def show(row: int, piece: str) -> None:
            nonlocal shown
            if echo is None or row != shown:
                return
            if piece:
                sys.stdout.write(piece)
            while shown < n and done[shown]:
                sys.stdout.write("\n")
                shown += 1
                if shown < n:
                    sys.stdout.write(f"\n{echo[shown]}\n{''.join(texts[shown])}")
            sys.stdout.flush()

        hidden = [others_evidence(self.runner.cache, k) if k is not None else [] for k in map(self.store_index,
                                                                                             range(n))]
        batch = frozen_batch(self.runner, n, self._room(suffixes), hidden)
        doc = batch.doc
        if echo is not None and echo[0] is not None:
            sys.stdout.write(f"{echo[0]}\n")
        try:
            with AnswerInterrupts() as interrupts:
                for row, piece, finished in answer_together(batch, self.lm.tokenizer, suffixes, self.max_tokens,
                                                            sampling, stop_ids(self.lm.tokenizer, self.lm.model),
                                                            on_token):
                    interrupts.check()
                    texts[row].append(piece)
                    done[row] = finished
                    show(row, piece)
                interrupts.check()
        finally:
            self.stats.seconds_generate = time.perf_counter() - start + seconds_before
            self.stats.answer_batch = {"questions": n, "document_tokens": doc.n, "steps": batch.steps,
                                       "frozen_bytes": doc.nbytes() + batch.nbytes(),
                                       "decode_graph": batch.graph_counts.as_dict() if batch.on_cuda else None}
            if echo is not None and shown < n:  # interrupted: end the line
                sys.stdout.write("\n")
                sys.stdout.flush()
        return ["".join(t) for t in texts]

    def record(self, generation: dict) -> dict:
        """Everything needed to reproduce the run."""
        return {
            "model_id": self.lm.model_id,
            "model_hash": self.lm.model_hash,
            "dtype": str(self.lm.dtype).removeprefix("torch."),
            "weights": self.lm.weights,
            "device": str(self.lm.device),
            "settings": asdict(self.config) | {"effective_sinks": self.n_sinks},
            "sizing": self.sizing.as_dict() if self.sizing is not None else None,
            "generation": generation,
            "input_sha256": self._input_record()["sha256"],
            "input": {k: v for k, v in self._input_record().items() if k != "sha256"},
            "versions": versions(),
        }

    def _input_record(self) -> dict:
        """What was read: here, or by the run that wrote the --load-cache file (plus that file's path)."""
        if self.loaded is not None:
            return self.loaded
        return {"sha256": self.input.text_sha256, "sources": self.sources, "files": len(self.input.files_read),
                "pages": self.input.pages_read, "replaced_bytes": self.input.replaced_bytes,
                "skipped": self.input.skipped}

    def finish(self, doc: dict, generation: dict, as_json: bool, show_report: bool) -> None:
        """Stats line and report on stderr, or the JSON document on stdout."""
        graph = self.runner.decode_report()
        frozen = (self.stats.answer_batch or {}).get("decode_graph")
        if graph is None and frozen is not None:  # the answers came from the frozen cache, through its own graph
            graph = {**frozen, "off": None}
        self.stats.decode_graph = graph
        if graph and graph["off"] and not graph["replayed"]:
            Say.info(f"[dim]decoded without a CUDA graph (slower at batch 1): {graph['off']}[/]")
        if as_json:
            doc = {**doc, "stats": self.stats.as_dict(), "retention": self.retention,
                   "record": self.record(generation)}
            sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
            sys.stdout.flush()
        if self.evidence and not as_json:
            if self.evidence_by_question is None:
                print_citations(self.evidence, every=show_report)
            else:
                for i, records in enumerate(self.evidence_by_question):
                    if records:
                        print_citations(records, every=show_report, question=i + 1)
        if show_report and self.retention:
            print_report(self.retention)
        Say.info(f"[dim]{self.stats.line()}[/]")
        ck.done(self._checkpoint)
