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
[B·Hq·L, P + T] float32 logits written and read twice.
"""
from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 64  # queries per row and pass: bounds the float32 logits at B·Hq·BLOCK·(P + T)


def _hidden(n_doc: int, n_tail: int, n_q: int, tail_len: Tensor, visible: Tensor | None,
           window: int | None) -> Tensor:
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
        doc_hidden |= torch.arange(n_doc, device=dev)[None, None, :] <= (pos - window)[:, :, None]
        tail_hidden |= (n_doc + t)[None, None, :] <= (pos - window)[:, :, None]
    return torch.cat([doc_hidden, tail_hidden], dim=-1)


def shared_prefix_attention_ref(
    q: Tensor, k_doc: Tensor, v_doc: Tensor, visible: Tensor | None, k_tail: Tensor, v_tail: Tensor,
    tail_len: Tensor, scale: float, softcap: float | None = None, window: int | None = None,
) -> Tensor:
    """The definition, row by row: [visible prefix | tail up to its length], float32 softmax, causal in the tail."""
    b, hq, n_q, d = q.shape
    hkv, n_doc = k_doc.shape[1], k_doc.shape[2]
    g = hq // hkv
    out = torch.empty_like(q)
    for r in range(b):
        n = int(tail_len[r])
        keep = torch.arange(n_doc, device=q.device) if visible is None else visible[r].nonzero().flatten()
        k = torch.cat([k_doc[0][:, keep], k_tail[r, :, :n]], dim=1).float()  # [Hkv, K, D]
        v = torch.cat([v_doc[0][:, keep], v_tail[r, :, :n]], dim=1).float()
        pos_k = torch.cat([keep, n_doc + torch.arange(n, device=q.device)])
        pos_q = n_doc + n - n_q + torch.arange(n_q, device=q.device)  # [L]
        qr = q[r].float().view(hkv, g * n_q, d)
        s = (qr @ k.transpose(-1, -2)).view(hkv, g, n_q, -1) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        hidden = pos_k[None, :] > pos_q[:, None]
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


def shared_prefix_attention(
    q: Tensor, k_doc: Tensor, v_doc: Tensor, visible: Tensor | None, k_tail: Tensor, v_tail: Tensor,
    tail_len: Tensor, scale: float, softcap: float | None = None, window: int | None = None,
) -> Tensor:
    """Same contract as `shared_prefix_attention_ref`; the prefix read once for every row (module docstring)."""
    b, hq, n_q, d = q.shape
    hkv, n_doc, n_tail = k_doc.shape[1], k_doc.shape[2], k_tail.shape[2]
    g = hq // hkv
    assert hq == g * hkv and k_tail.shape[:2] == (b, hkv), (q.shape, k_doc.shape, k_tail.shape)
    kd_t = k_doc[0].transpose(-1, -2)  # [Hkv, D, P]
    kt_t = k_tail.transpose(-1, -2)  # [B, Hkv, D, T]
    vd = v_doc[0]
    hidden = _hidden(n_doc, n_tail, n_q, tail_len, visible, window)[:, None, None]  # [B, 1, 1, L, P + T]
    out = torch.empty_like(q)
    for m0 in range(0, n_q, BLOCK):
        m1 = min(n_q, m0 + BLOCK)
        rows = m1 - m0
        qb = q[:, :, m0:m1].reshape(b, hkv, g, rows, d)
        # prefix: every row's queries of KV head h side by side, [Hkv, B·G·rows, D] x [Hkv, D, P]
        q_fold = qb.permute(1, 0, 2, 3, 4).reshape(hkv, b * g * rows, d)
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
