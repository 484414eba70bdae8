"""Attention of several rows (questions) over one shared, read-only prefix plus each row's own tail.

    shared_prefix_attention(q, k_doc, v_doc, visible, k_tail, v_tail, tail_len, scale, softcap, window)

    q              [B, Hq, L, D]   each row's newest L queries, rotated at their positions
    k_doc, v_doc   [1, Hkv, P, D]  the prefix every row attends to (keys rotated at positions 0 .. P-1)
    visible        [B, P] bool     which prefix keys each row may see (None: all of them)
    k_tail, v_tail [B, Hkv, T, D]  each row's own keys (rotated at P + t) and values, the newest L included
    tail_len       [B] int64       row b's tail holds tail_len[b] keys; its queries are its last L of them
                                   (query m at tail index tail_len[b] - L + m, absolute position P + that)

Row b's query m sees every visible prefix key and its own tail up to itself (causal), which is what full attention
over `[prefix | tail_b]` gives. `softcap` (Gemma 2's capping of the logits) and `window` (a sliding-window layer:
a key `window` or more positions older than the query is hidden) follow `chunk_attention_ref`. Returns the output
[B, Hq, L, D] in q's dtype; no scores (nothing is evicted while answering).

`shared_prefix_attention_ref` is the definition: for every row, the prefix's visible keys and its tail cut at its
length, concatenated, then a float32 softmax. `shared_prefix_attention` computes the same without concatenating
anything per row: the B·G·L queries of each KV head are stacked into one matrix, so each prefix key is read once for
all rows (one [B·G·L, D] x [D, P] product per KV head), and the tails' logits join the prefix's in one softmax. On
CUDA the 16-bit products accumulate in float32 (`torch.bmm(..., out_dtype=float32)`); elsewhere the inputs are
upcast. Cost per call: 4·B·Hq·L·(P + T)·D FLOPs; bytes: the prefix's K and V once, each tail's once, and the
[B·Hq·L, P + T] float32 logits written and read a few times. On CUDA where every row sees the whole prefix (no
cap or cutting window; an evidence mask only splits the prefix, see below) the prefix part instead runs in
torch's flash kernel, which also returns
each query's log-sum-exp, and the tails join it through `merge_with_tail`: the logits never reach memory (at 8
rows of an 8B model's GQA groups they would weigh more than the prefix's K and V). The CPU takes the same route
through torch's CPU flash kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch

BLOCK = 64  # queries per row and pass: bounds the float32 logits at B·Hq·BLOCK·(P + T)


def _hidden(n_doc: int, n_tail: int, n_q: int, tail_len: Tensor, visible: Tensor | None, window: int | None,
            doc_pos: Tensor | None = None) -> Tensor:
    """Which keys each of the last L queries may not see: [B, L, P + T] bool (prefix keys, then tail keys)."""
    dev = tail_len.device
    q_idx = tail_len[:, None] - n_q + torch.arange(n_q, device=dev)[None, :]  # [B, n_q] tail index of each query
    t = torch.arange(n_tail, device=dev)
    tail_hidden = t[None, None, :] > q_idx[:, :, None]  # causal; keys at or past the length are after every query
    doc_hidden = torch.zeros(tail_len.shape[0], n_q, n_doc, dtype=torch.bool, device=dev)
    if visible is not None:
        doc_hidden |= ~visible[:, None, :]
    if window is not None:
        pos = n_doc + q_idx  # [B, n_q]
        at = torch.arange(n_doc, device=dev) if doc_pos is None else doc_pos
        doc_hidden |= at[None, None, :] <= (pos - window)[:, :, None]
        tail_hidden |= (n_doc + t)[None, None, :] <= (pos - window)[:, :, None]
    return torch.cat([doc_hidden, tail_hidden], dim=-1)


def shared_prefix_attention_ref(
    q: Tensor, k_doc: Tensor, v_doc: Tensor, visible: Tensor | None, k_tail: Tensor, v_tail: Tensor,
    tail_len: Tensor, scale: float, softcap: float | None = None, window: int | None = None,
    doc_pos: Tensor | None = None,
) -> Tensor:
    """The definition, row by row: [visible prefix | tail up to its length], float32 softmax, causal in the tail.
    `doc_pos` [P]: each prefix key's position (None: its index), which only a window reads."""
    b, hq, n_q, d = q.shape
    hkv, n_doc = k_doc.shape[1], k_doc.shape[2]
    g = hq // hkv
    out = torch.empty_like(q)
    at = torch.arange(n_doc, device=q.device) if doc_pos is None else doc_pos
    for r in range(b):
        n = int(tail_len[r])
        keep = torch.arange(n_doc, device=q.device) if visible is None else visible[r].nonzero().flatten()
        k = torch.cat([k_doc[0][:, keep], k_tail[r, :, :n]], dim=1).float()  # [Hkv, K, D]
        v = torch.cat([v_doc[0][:, keep], v_tail[r, :, :n]], dim=1).float()
        pos_k = torch.cat([at[keep], n_doc + torch.arange(n, device=q.device)])
        pos_q = n_doc + n - n_q + torch.arange(n_q, device=q.device)  # [L]
        qr = q[r].float().view(hkv, g * n_q, d)
        s = (qr @ k.transpose(-1, -2)).view(hkv, g, n_q, -1) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        own = n - n_q + torch.arange(n_q, device=q.device)  # each query's tail index
        causal = torch.arange(n, device=q.device)[None, :] > own[:, None]
        hidden = torch.cat([torch.zeros(n_q, keep.numel(), dtype=torch.bool, device=q.device), causal], dim=1)
        if window is not None:
            hidden |= pos_k[None, :] <= pos_q[:, None] - window
        p = torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1)
        out[r] = (p.view(hkv, g * n_q, -1) @ v).view(hkv, g, n_q, d).reshape(hq, n_q, d).to(q.dtype)
    return out


def _product(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in float32: 16-bit CUDA inputs accumulate in float32 in place; anything else is upcast first."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and a.dim() == 3:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _weights(p: Tensor, v: Tensor) -> Tensor:
    """Probabilities for the product with v: rounded to v's 16-bit dtype on CUDA (as flash kernels do), else float32."""
    return p.to(v.dtype) if v.is_cuda and v.dtype in (torch.float16, torch.bfloat16) else p


def fold_rows(q: Tensor, hkv: int) -> Tensor:
    """q [B, Hq, L, D] -> [1, Hkv, B·G·L, D]: every row's queries of KV head h side by side (row-major in b, g, l)."""
    b, hq, n_q, d = q.shape
    return q.reshape(b, hkv, hq // hkv, n_q, d).transpose(0, 1).reshape(1, hkv, b * (hq // hkv) * n_q, d)


def prefix_flash(q_fold: Tensor, k_doc: Tensor, v_doc: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of the stacked queries [1, Hkv, M, D] over the prefix, with each query's log-sum-exp of its
    scaled logits: (out [1, Hkv, M, D], lse [1, Hkv, M] float32). torch's flash kernels (one pass, no logits in
    memory), the ones F.scaled_dot_product_attention runs on CUDA and on the CPU, called for their log-sum-exp."""
    if q_fold.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q_fold, k_doc, v_doc, 0.0, False, False,
                                                                       scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_fold, k_doc, v_doc, 0.0, False,
                                                                               scale=scale)
    return out, lse.float()


def prefix_attention_lse_ref(q_fold: Tensor, k_doc: Tensor, v_doc: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """`prefix_flash`'s contract in float32 torch (its reference)."""
    s = (q_fold.float() @ k_doc.float().transpose(-1, -2)) * scale
    return (torch.softmax(s, dim=-1) @ v_doc.float()).to(q_fold.dtype), torch.logsumexp(s, dim=-1)


def merge_with_rest(q: Tensor, out_c: Tensor, lse_c: Tensor, k_x: Tensor, v_x: Tensor, x_visible: Tensor | None,
                    k_tail: Tensor, v_tail: Tensor, tail_len: Tensor, scale: float) -> Tensor:
    """Row b's output over [common prefix | the rest of the prefix it sees | its tail], from the common part's
    normalised output and log-sum-exp (stacked, [1, Hkv, B·G·L, ·]), the logits of the rest (k_x, v_x
    [1, Hkv, X, D] shared, `x_visible` [B, X] which each row sees) and of the tail (causal, cut at its length):
    one softmax over all three, merged by log-sum-exp. Returns [B, Hq, L, D] in q's dtype."""
    b, hq, n_q, d = q.shape
    hkv, n_x, n_tail = k_tail.shape[1], k_x.shape[2], k_tail.shape[2]
    g = hq // hkv
    o_c = out_c.view(hkv, b, g, n_q, d).transpose(0, 1).float()  # [B, Hkv, G, L, D]
    l_c = lse_c.view(hkv, b, g, n_q).transpose(0, 1)  # [B, Hkv, G, L]
    s_t = _product(q.reshape(b * hkv, g * n_q, d), k_tail.transpose(-1, -2).reshape(b * hkv, d, n_tail))
    s = s_t.view(b, hkv, g, n_q, n_tail)
    if n_x:
        s_x = _product(fold_rows(q, hkv)[0], k_x[0].transpose(-1, -2)).view(hkv, b, g, n_q, n_x).transpose(0, 1)
        s = torch.cat([s_x, s], dim=-1)
    s = s * scale
    hidden = _hidden(n_x, n_tail, n_q, tail_len, x_visible, None)[:, None, None]  # [B, 1, 1, L, X + T]
    s = s.masked_fill(hidden, float("-inf"))
    m = torch.maximum(s.amax(dim=-1), l_c)  # every row sees its own key: finite
    p = torch.exp(s - m[..., None])
    w_c = torch.exp(l_c - m)
    p_t = p[..., n_x:].reshape(b * hkv, g * n_q, n_tail)
    o = o_c * w_c[..., None] + _product(_weights(p_t, v_tail), v_tail.reshape(b * hkv, n_tail, d)).view(
        b, hkv, g, n_q, d)
    if n_x:
        p_x = p[..., :n_x].transpose(0, 1).reshape(hkv, b * g * n_q, n_x)
        o = o + _product(_weights(p_x, v_x), v_x[0]).view(hkv, b, g, n_q, d).transpose(0, 1)
    o = o / (w_c + p.sum(dim=-1))[..., None]
    return o.reshape(b, hq, n_q, d).to(q.dtype)


def shared_prefix_attention(
    q: Tensor, k_doc: Tensor, v_doc: Tensor, visible: Tensor | None, k_tail: Tensor, v_tail: Tensor,
    tail_len: Tensor, scale: float, softcap: float | None = None, window: int | None = None,
    doc_pos: Tensor | None = None, n_common: int | None = None,
) -> Tensor:
    """Same contract as `shared_prefix_attention_ref`; the prefix read once for every row (module docstring).

    `n_common`: the first n_common prefix keys are visible to every row (None: all of them when `visible` is None,
    else none). Where `dispatch.shared_prefix_path` says "flash", those run in torch's flash kernel and the rest of
    the prefix and the tails join them through `merge_with_rest`: no [rows, P] logits in memory, which at 8 rows
    of an 8B model's GQA groups would weigh more than the prefix's K and V."""
    n_doc = k_doc.shape[2]
    n_common = (n_doc if visible is None else 0) if n_common is None else n_common
    if n_common and dispatch.shared_prefix_path(q, k_doc, k_tail.shape[2], softcap, window) == "flash":
        hkv = k_doc.shape[1]
        out, lse = prefix_flash(fold_rows(q, hkv), k_doc[:, :, :n_common], v_doc[:, :, :n_common], scale)
        x_visible = None if visible is None else visible[:, n_common:]
        return merge_with_rest(q, out, lse, k_doc[:, :, n_common:], v_doc[:, :, n_common:], x_visible, k_tail,
                               v_tail, tail_len, scale)
    return _stacked(q, k_doc, v_doc, visible, k_tail, v_tail, tail_len, scale, softcap, window, doc_pos)


def _stacked(
    q: Tensor, k_doc: Tensor, v_doc: Tensor, visible: Tensor | None, k_tail: Tensor, v_tail: Tensor,
    tail_len: Tensor, scale: float, softcap: float | None = None, window: int | None = None,
    doc_pos: Tensor | None = None,
) -> Tensor:
    """The torch form: one product per KV head over the prefix for every row's queries, the logits in memory."""
    b, hq, n_q, d = q.shape
    hkv, n_doc, n_tail = k_doc.shape[1], k_doc.shape[2], k_tail.shape[2]
    g = hq // hkv
    assert hq == g * hkv and k_tail.shape[:2] == (b, hkv), (q.shape, k_doc.shape, k_tail.shape)
    kd_t = k_doc[0].transpose(-1, -2)  # [Hkv, D, P]
    kt_t = k_tail.transpose(-1, -2)  # [B, Hkv, D, T]
    vd = v_doc[0]
    hidden = _hidden(n_doc, n_tail, n_q, tail_len, visible, window, doc_pos)[:, None, None]  # [B, 1, 1, L, P + T]
    out = torch.empty_like(q)
    for m0 in range(0, n_q, BLOCK):
        m1 = min(n_q, m0 + BLOCK)
        rows = m1 - m0
        qb = q[:, :, m0:m1].reshape(b, hkv, g, rows, d)
        q_fold = fold_rows(q[:, :, m0:m1], hkv)[0]  # [Hkv, B·G·rows, D] x [Hkv, D, P]
        s_doc = _product(q_fold, kd_t).view(hkv, b, g, rows, n_doc).transpose(0, 1)  # [B, Hkv, G, rows, P]
        s_tail = _product(qb.reshape(b * hkv, g * rows, d), kt_t.reshape(b * hkv, d, n_tail))
        s_tail = s_tail.view(b, hkv, g, rows, n_tail)
        s = torch.cat([s_doc, s_tail], dim=-1) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        p = torch.softmax(s.masked_fill(hidden[..., m0:m1, :], float("-inf")), dim=-1)
        p_doc, p_tail = p[..., :n_doc], p[..., n_doc:]
        p_fold = p_doc.transpose(0, 1).reshape(hkv, b * g * rows, n_doc)
        o = _product(_weights(p_fold, vd), vd).view(hkv, b, g, rows, d).transpose(0, 1)
        p_tail = p_tail.reshape(b * hkv, g * rows, n_tail)
        o = o + _product(_weights(p_tail, v_tail), v_tail.reshape(b * hkv, n_tail, d)).view(b, hkv, g, rows, d)
        out[:, :, m0:m1] = o.reshape(b, hq, rows, d).to(q.dtype)
    return out
