"""Several questions answered together, from the document's cache frozen read-only (docs/ALGORITHM.md §12).

    hidden = [others_evidence(runner.cache, i) for i in range(n)]
    batch = frozen_batch(runner, n, room=longest_request + max_tokens, hidden=hidden)  # SharedDocument + AnswerBatch
    for row, piece, done in answer_together(batch, tokenizer, requests, max_tokens, sampling, stop): ...

Once the input is read, nothing needs evicting any more: `SharedDocument` rotates every layer's cached keys once
at their rank and keeps them with the values in age order, as the next token would see them. Each question gets
a *tail* of its own, preallocated for its closing request and its answer (`AnswerBatch`); its tokens are rotated at
positions after the document's and attend to the document's keys and to their own tail
(`cascade_kernels.shared_attention`). Every decode step feeds one token of every question as one batch: the
weights and the document's K and V are read once for all of them, each tail once. A question of a several-question
evidence store does not see the other questions' evidence (`hidden`: the store slots of theirs it would release),
which keep their positions.

With nothing evicted during reading this is exactly the model's own attention over [input | request | answer],
the oracle of tests/engine/test_batch_answer.py; a question answered alone here and in a batch gets the same
logits. Unlike answering from a copy of the cache (engine/reading.py `answer`), the document is not thinned while
the answer is written, and the memory is one frozen copy of the cache plus B tails, whatever B is.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor

from cascade_kernels.dispatch import graph_path, shared_prefix_path
from cascade_kernels.rope import apply_rope
from cascade_kernels.shared_attention import fold_rows, prefix_flash, shared_prefix_attention

from .decode_graph import GraphCounts
from .errors import CapacityError
from .families import layer_attentions
from .generate import Sampling, next_token
from .reading import AnswerText
from .runner import Runner
from .sizing import free_bytes


class SharedDocument:
    """Every layer's cached keys rotated at their rank, the values ([1, Hkv, P, D] each; float32 on a CPU, where
    attention runs in float32), which of them each question sees ([B, P] bool, or None: all), and their positions.

    Keys every question sees come first (`n_common` of them), so that they can be read by one flash kernel for all
    questions; the rest (the other questions' evidence) follow, each key at its own position (`pos`).

    `room`: on a CPU, where every question sees every key, each layer's buffers keep `room` slots free after the
    document's keys for one question's tail: an `AnswerBatch` of one row takes them (`claim_room`) and then reads
    the document and its tail with one flash call a step, with nothing to merge (the merge is ~45 small torch ops
    a layer; the step takes 0.88x the time, docs/BENCHMARKS.md). Ignored elsewhere: on CUDA the step is a graph of
    fixed shapes."""

    def __init__(self, runner: Runner, hidden: list[Iterable[int]] | None = None, room: int = 0):
        cache = runner.cache
        if cache.shape.layer_devices is not None:
            raise ValueError("a model spread over several devices answers one question at a time")
        self.n = cache.n_past
        self.fams = layer_attentions(runner.model)
        cos, sin = runner.rotary(self.n)
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.visible: list[Tensor | None] = []
        self.pos: list[Tensor | None] = []  # each key's position where the keys are reordered, else None
        self.n_common: list[int] = []
        cpu = cache.shape.device.type == "cpu"
        phys = getattr(cache, "ev_base", 0)
        hidden = [sorted(phys + s for s in h) for h in hidden] if hidden is not None else None
        self.room = room if cpu and (hidden is None or not any(hidden)) else 0
        self._claimed = False
        self._bufs: list[tuple[Tensor, Tensor]] = []  # with room: each layer's [1, Hkv, n + room, D] K and V
        with torch.inference_mode(), cache.peek():
            for layer, fam in enumerate(self.fams):
                k, v = cache.past(layer)  # pre-RoPE, age order
                c, s = fam.tables(cos, sin)
                k = apply_rope(k.float() if cpu else k, c.float() if cpu else c, s.float() if cpu else s)
                v = v.float() if cpu else v
                visible = self._visible(cache.past_slots(layer)[2], hidden)
                pos, n_common = None, self.n
                if visible is not None:  # every question's keys first, then the rest, each at its own position
                    common = visible.all(dim=0)
                    pos = torch.cat([common.nonzero().flatten(), (~common).nonzero().flatten()])
                    k, v, visible = k[:, :, pos], v[:, :, pos], visible[:, pos]
                    n_common = int(common.sum())
                if self.room:
                    kb, vb = (t.new_zeros(*t.shape[:2], self.n + self.room, t.shape[3]) for t in (k, v))
                    kb[:, :, : self.n], vb[:, :, : self.n] = k, v
                    self._bufs.append((kb, vb))
                    k, v = kb[:, :, : self.n], vb[:, :, : self.n]
                self.k.append(k if self.room else k.contiguous())
                self.v.append(v if self.room else v.contiguous())
                self.visible.append(visible)
                self.pos.append(pos)
                self.n_common.append(n_common)

    @staticmethod
    def _visible(order: Tensor, hidden: list[list[int]] | None) -> Tensor | None:
        if hidden is None or not any(hidden):
            return None
        rows = [~torch.isin(order, torch.tensor(h, dtype=order.dtype, device=order.device)) for h in hidden]
        return torch.stack(rows)

    def nbytes(self) -> int:
        """What the frozen copy holds, its room included."""
        held = [t for pair in self._bufs for t in pair] if self._bufs else self.k + self.v
        return sum(t.numel() * t.element_size() for t in held)

    def claim_room(self, room: int) -> list[tuple[Tensor, Tensor]] | None:
        """Every layer's whole K and V buffers [1, Hkv, n + room, D], for the one batch that may write `room` keys
        after the document's; None if there is no such room (or another batch has it)."""
        if self._claimed or room > self.room or not self._bufs:
            return None
        self._claimed = True
        return self._bufs


class AnswerBatch:
    """The questions' tails and the step that feeds them: `prefill(row, ids)` for one question's request, then
    `decode(tokens)` for one token of every row at once. Finished rows (`active` False) keep stepping in place
    (their outputs are not read), so the batch keeps its shape."""

    def __init__(self, runner: Runner, doc: SharedDocument, n_rows: int, room: int):
        if doc.n + room > runner.max_positions:
            raise CapacityError(f"position {doc.n + room - 1} is past the model's limit of {runner.max_positions}; "
                                f"lower `max_tokens` or `cache_size`")
        shape = runner.cache.shape
        self.runner, self.doc, self.rows, self.room = runner, doc, n_rows, room
        dtype = doc.k[0].dtype
        # one row may write its tail right after the document's keys (SharedDocument's room): one read a step
        self._whole = doc.claim_room(room) if n_rows == 1 else None
        if self._whole is not None:
            self.k = [kb[:, :, doc.n : doc.n + room] for kb, _ in self._whole]
            self.v = [vb[:, :, doc.n : doc.n + room] for _, vb in self._whole]
        else:
            self.k = [torch.zeros(n_rows, shape.n_kv_heads, room, shape.head_dim, dtype=dtype, device=shape.device)
                      for _ in doc.k]
            self.v = [torch.zeros_like(t) for t in self.k]
        self.length = torch.zeros(n_rows, dtype=torch.long, device=shape.device)  # tokens in each tail
        self.used = [0] * n_rows  # the same, on the host
        cos, sin = runner.rotary(doc.n + room)
        self.tables = [tuple(t.to(dtype) for t in fam.tables(cos, sin)) for fam in doc.fams]
        self._step: tuple | None = None  # rows (None: all), the step's tail indices [r, L], rotary rows per table
        self.graph = True  # on CUDA, replay decode steps as a CUDA graph (False: every step eager; bench/tests)
        self.graph_counts = GraphCounts()  # how the decode steps ran (on CUDA: eager, captured, replayed)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._ids = self._advance = self._logits = None  # the decode step's inputs and output, fixed addresses

    def nbytes(self) -> int:
        """What the tails hold beside the document's copy (nothing where they lie in its room)."""
        return 0 if self._whole is not None else sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def steps(self) -> int:
        """Decode steps taken (each feeds every row one token)."""
        c = self.graph_counts
        return c.eager + c.captured + c.replayed

    @property
    def on_cuda(self) -> bool:
        return self.length.is_cuda

    @torch.inference_mode()
    def prefill(self, row: int, ids: list[int]) -> Tensor:
        """Feed question `row`'s request; returns its next-token logits [V] float32."""
        if self.used[row] + len(ids) > self.room:
            raise CapacityError(f"the request of question {row + 1} needs {len(ids)} tokens, "
                                f"{self.room - self.used[row]} are left")
        dev = self.length.device
        rows = torch.tensor([row], device=dev)
        hidden = self._run(rows, torch.tensor([ids], dtype=torch.long, device=dev), torch.ones(1, dtype=torch.long,
                                                                                              device=dev) * len(ids))
        self.used[row] += len(ids)
        return self.runner.logits(hidden[:, -1])[0]

    @torch.inference_mode()
    def decode(self, tokens: list[int], active: list[bool]) -> Tensor:
        """Feed one token per row (a finished row's is ignored); returns the next-token logits [B, V] float32,
        valid until the next step. On CUDA the second step is captured as a CUDA graph and every later one replays
        it: the step's shapes never change (the tails are preallocated, their lengths live on the device)."""
        for row, on in enumerate(active):
            if on and self.used[row] >= self.room:
                raise CapacityError(f"question {row + 1}'s tail is full ({self.room} tokens)")
        ids, advance = self._inputs(tokens, active)
        if self._graph is not None:
            self._graph.replay()
            self.graph_counts.replayed += 1
        elif self.graph and self.graph_counts.eager and graph_path(ids.device) == "graph":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._logits = self._decode_step(ids, advance)
            graph.replay()
            self._graph = graph
            self.graph_counts.captured += 1
        else:  # on CUDA the first step compiles and warms up what the capture records
            self._logits = self._decode_step(ids, advance)
            self.graph_counts.eager += 1
        self.used = [u + int(on) for u, on in zip(self.used, active)]
        return self._logits

    def _inputs(self, tokens: list[int], active: list[bool]) -> tuple[Tensor, Tensor]:
        """The step's token ids [B, 1] and advances [B] in tensors at fixed addresses (one pinned, asynchronous
        copy on CUDA: no host synchronisation)."""
        dev = self.length.device
        if self._ids is None:
            self._ids = torch.zeros(self.rows, 1, dtype=torch.long, device=dev)
            self._advance = torch.zeros(self.rows, dtype=torch.long, device=dev)
        host = torch.tensor([*tokens, *map(int, active)], dtype=torch.long)
        if dev.type == "cuda":
            host = host.pin_memory()
        both = host.to(dev, non_blocking=True)
        self._ids.copy_(both[: self.rows, None])
        self._advance.copy_(both[self.rows :])
        return self._ids, self._advance

    def _decode_step(self, ids: Tensor, advance: Tensor) -> Tensor:
        return self.runner.logits(self._run(None, ids, advance)[:, -1])

    def _run(self, rows: Tensor | None, ids: Tensor, advance: Tensor) -> Tensor:
        """ids [r, L] of `rows` (None: every row) through the layers; the tails then hold them (`advance` each)."""
        length = self.length if rows is None else self.length[rows]
        pos = length[:, None] + torch.arange(ids.shape[1], device=ids.device)  # [r, L] tail index
        self._step = (rows, pos, {})  # the last: the step's rotary rows per table, shared by the layers
        try:
            hidden = self.runner.run_layers(ids, self)
        finally:
            self._step = None
        if rows is None:
            self.length += advance
        else:
            self.length[rows] += advance
        return hidden

    # called by every layer's patched attention (engine/attention.py) while `_run` is in flight
    def attend(self, layer: int, fam, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        rows, pos, rotary = self._step
        cos, sin = self.tables[layer]
        if id(cos) not in rotary:  # most layers share one table: gathered once per step
            at = self.doc.n + pos  # [r, L] absolute positions
            rotary[id(cos)] = (cos[at][:, None], sin[at][:, None])  # [r, 1, L, D]
        c, s = rotary[id(cos)]
        q_rot, k_rot = apply_rope(q.to(c.dtype), c, s), apply_rope(k.to(c.dtype), c, s)
        doc = self.doc
        if self._whole is not None and rows is None and q.shape[2] == 1 and shared_prefix_path(
                q_rot, doc.k[layer], self.used[0] + 1, fam.softcap, fam.window) == "flash":
            return self._attend_whole(layer, fam, q_rot, k_rot, v).to(q.dtype)
        tk, tv = self.k[layer], self.v[layer]
        where = (torch.arange(pos.shape[0], device=pos.device) if rows is None else rows)[:, None]
        tk[where, :, pos] = k_rot.transpose(1, 2)  # [r, L, Hkv, D]
        tv[where, :, pos] = v.to(tv.dtype).transpose(1, 2)
        visible = doc.visible[layer]
        if rows is not None:
            tk, tv, visible = tk[rows], tv[rows], None if visible is None else visible[rows]
        out = shared_prefix_attention(q_rot, doc.k[layer], doc.v[layer], visible, tk, tv, pos[:, -1] + 1,
                                      fam.scaling, fam.softcap, fam.window, doc.pos[layer], doc.n_common[layer])
        return out.to(q.dtype)

    def _attend_whole(self, layer: int, fam, q_rot: Tensor, k_rot: Tensor, v: Tensor) -> Tensor:
        """One row's decode step where its tail continues the document's buffers: its key and value written after
        the tail's, then one flash call over [document | tail]. q_rot [1, Hq, 1, D], k_rot and v [1, Hkv, 1, D]."""
        kb, vb = self._whole[layer]
        at = self.doc.n + self.used[0]  # the length lives on the host too: slices, no index tensors
        kb[:, :, at] = k_rot[:, :, 0]
        vb[:, :, at] = v[:, :, 0]
        hkv = kb.shape[1]
        out, _ = prefix_flash(fold_rows(q_rot, hkv), kb[:, :, : at + 1], vb[:, :, : at + 1], fam.scaling)
        return out.reshape(q_rot.shape)


def frozen_batch(runner: Runner, n_rows: int, room: int, hidden: list[Iterable[int]] | None = None) -> AnswerBatch:
    """The batch that answers `n_rows` questions of up to `room` tokens each (request and answer) from the frozen
    cache, over its own `SharedDocument` (`hidden` as it takes it); one question's tail lies in the copy's room."""
    doc = SharedDocument(runner, hidden, room=room if n_rows == 1 else 0)
    return AnswerBatch(runner, doc, n_rows, room)


def frozen_bytes(runner: Runner, n_rows: int, room: int) -> int:
    """What answering `n_rows` questions of up to `room` tokens (request and answer) each from the frozen cache takes
    beside the cache itself: `SharedDocument`'s keys and values of every visible token (float32 on a CPU, else the
    cache's dtype) and `AnswerBatch`'s tails."""
    shape = runner.cache.shape
    element = 4 if shape.device.type == "cpu" else shape.dtype.itemsize
    per_token = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * element
    return per_token * (runner.cache.n_past + n_rows * room)


def frozen_refusal(runner: Runner, n_rows: int, room: int) -> str | None:
    """Why `n_rows` answers of up to `room` tokens each (request and answer) cannot come from the frozen cache,
    as the end of a sentence; None: they can. They need the model on one device, the model's positions for the
    cache's tokens and then `room` (what `AnswerBatch` checks), and free memory for the frozen copy
    (`frozen_bytes`) with a tenth to spare."""
    cache = runner.cache
    if cache.shape.layer_devices is not None:
        return "a model over several devices answers from the evicting cache"
    if cache.n_past + room > runner.max_positions:
        return ("the requests and `max_tokens` do not fit the model's positions after the frozen cache "
                "(lower `max_tokens` or `cache_size`)")
    need, free = frozen_bytes(runner, n_rows, room), free_bytes(cache.shape.device)
    if need * 1.1 > free:
        return f"the frozen copy of the cache needs {need / 2**20:,.0f} MiB and {free / 2**20:,.0f} MiB are free"
    return None


def answer_together(
    batch: AnswerBatch, tokenizer, requests: list[list[int]], max_tokens: int, sampling: Sampling,
    stop: Iterable[int] = frozenset(), on_token=None,
) -> Iterator[tuple[int, str, bool]]:
    """Answer every request of `batch` (row i's closing ids `requests[i]`), decoding them together: yields
    (row, text piece, finished) as each row's text becomes final, a row's last event with finished True.

    Each row samples exactly as `engine.generate.generate` would alone: its own generator seeded with
    `sampling.seed`, the repetition controls over its own answer."""
    if any(not r for r in requests):
        raise ValueError("the closing request is empty; the answer needs at least one token to start from")
    stop = frozenset(stop)
    n = len(requests)
    logits = torch.stack([batch.prefill(row, ids) for row, ids in enumerate(requests)])  # [B, V]
    processors = sampling.processors()
    generators = [torch.Generator().manual_seed(sampling.seed) for _ in range(n)]
    answers: list[list[int]] = [[] for _ in range(n)]
    texts = [AnswerText(tokenizer) for _ in range(n)]
    active = [True] * n
    tokens = [0] * n
    while True:
        for row in range(n):
            if not active[row]:
                continue
            token = next_token(logits[row], sampling, processors, answers[row], generators[row])
            if token in stop:
                active[row] = False
            else:
                answers[row].append(token)
                tokens[row] = token
                if on_token is not None:
                    on_token(token)
                piece = texts[row].push(token)
                if len(answers[row]) >= max_tokens:
                    active[row] = False
                if piece:
                    yield row, piece, False
            if not active[row]:
                yield row, texts[row].flush(), True
        if not any(active):
            return
        logits = batch.decode(tokens, active)
