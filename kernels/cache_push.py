"""One decoded token into the cascade's rings: the whole chain of pushes in one kernel (ALGORITHM.md §2).

    push_token(k_buf, v_buf, score_buf, idx_buf, k_new, v_new, s_new, chain, t, n_sinks)

A decode step inserts a single token. Which slots it touches is planned on the host from integers: the token
goes into ring 0; every ring that accepts and is full pushes its oldest item on to the next one; the chain ends
in a ring with room, in a refusing ring where the carried item competes for the newest slot, or past the last
ring. `chain` lists those slots in order:

    code >= 0      slot `code` takes the carried item; its old occupant is carried on (or, last, dropped)
    code <  0      slot `-code - 1` is a refusing ring's newest: the carried item takes it iff its score is at
                   least the occupant's (ties go to the newcomer); the chain ends there

Every (batch row, KV head) carries its own item, since the compete depends on that head's scores; the slots
are the same for all. The generic chunk update (engine/cache/cascade.py) does the same with a few dozen small
torch ops per layer; at batch 1 on a GPU those launches cost more than the bytes. This kernel is one launch,
one program per (b, KV head), a D-wide vector per step.

    k_buf, v_buf    [B, Hkv, S + N, D]  keys (before RoPE) and values, written in place
    score_buf       [B, Hkv, N] fp32     scores of the non-sink slots, already decayed and updated by this step
    idx_buf         [B, Hkv, S + N] int64 stream index of each slot's token
    k_new, v_new    [B, Hkv, 1, D]      the step's own key and value
    s_new           [B, Hkv] fp32        the step's own initial score
    chain           [m] int32/int64      as above, on the buffers' device; SKIP pads a chain to a fixed length
    t               int, or [1] int64    the token's stream index (a tensor on the buffers' device: a decode step
                                         captured in a CUDA graph reads it from there, engine/decode_graph.py)

A chain padded with SKIP and a tensor `t` give one kernel launch of fixed arguments for every decode step, which
is what a captured graph needs: only the contents of `chain` and `t` change from step to step.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from . import dispatch
from ._triton import jit as _jit
from ._triton import tl, triton

SKIP = -(1 << 62)  # a chain code that does nothing: pads a chain to a fixed length


def push_token_ref(k_buf: Tensor, v_buf: Tensor, score_buf: Tensor, idx_buf: Tensor, k_new: Tensor, v_new: Tensor,
                   s_new: Tensor, chain: Tensor, t: int | Tensor, n_sinks: int) -> None:
    """The torch reference: the chain step by step on whole [B, Hkv] slices."""
    t = t if isinstance(t, int) else int(t.reshape(-1)[0])
    item = (k_new[:, :, 0], v_new[:, :, 0], s_new, torch.full_like(idx_buf[:, :, 0], t))
    for code in chain.tolist():
        if code == SKIP:
            continue
        slot = code if code >= 0 else -code - 1
        bufs = (k_buf[:, :, slot], v_buf[:, :, slot], score_buf[:, :, slot - n_sinks], idx_buf[:, :, slot])
        if code < 0:
            win = item[2] >= bufs[2]
            for buf, new in zip(bufs, item):
                buf.copy_(torch.where(win.view(win.shape + (1,) * (buf.dim() - 2)), new, buf))
            return
        old = tuple(buf.clone() for buf in bufs)
        for buf, new in zip(bufs, item):
            buf.copy_(new)
        item = old


@_jit
def _push_kernel(
    K, V, SB, IDX, KN, VN, SN, CHAIN,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_sb, stride_sh,
    stride_ib, stride_ih,
    stride_knb, stride_knh,
    stride_vnb, stride_vnh,
    stride_snb, stride_snh,
    n_steps, t, n_kv_heads, n_sinks, skip,
    HEAD_DIM: tl.constexpr, T_IN_MEMORY: tl.constexpr,
):
    """Program (b·Hkv + h) walks the chain for its head: read the slot's occupant, write the carried item
    (always, or for a compete only if it wins), carry the occupant on."""
    pid = tl.program_id(0)
    b = (pid // n_kv_heads).to(tl.int64)
    h = (pid % n_kv_heads).to(tl.int64)
    offs = tl.arange(0, HEAD_DIM)
    k_base = K + b * stride_kb + h * stride_kh + offs
    v_base = V + b * stride_vb + h * stride_vh + offs
    s_base = SB + b * stride_sb + h * stride_sh - n_sinks  # indexed by physical slot
    i_base = IDX + b * stride_ib + h * stride_ih
    ck = tl.load(KN + b * stride_knb + h * stride_knh + offs)
    cv = tl.load(VN + b * stride_vnb + h * stride_vnh + offs)
    cs = tl.load(SN + b * stride_snb + h * stride_snh)
    if T_IN_MEMORY:
        ci = tl.load(t).to(tl.int64)
    else:
        ci = tl.full([], t, tl.int64)
    for step in range(n_steps):
        code = tl.load(CHAIN + step).to(tl.int64)
        live = code != skip
        slot = tl.where(live, tl.where(code >= 0, code, -code - 1), n_sinks)  # a SKIP reads a real slot, writes none
        old_k = tl.load(k_base + slot * stride_kn)
        old_v = tl.load(v_base + slot * stride_vn)
        old_s = tl.load(s_base + slot)
        old_i = tl.load(i_base + slot)
        write = live & ((code >= 0) | (cs >= old_s))
        # the same mask over the head dim, built as a vector comparison: Triton 3.9's interpreter broadcasts a
        # scalar mask to int64, which its store refuses
        row = (offs * 0 + write.to(tl.int32)) != 0
        tl.store(k_base + slot * stride_kn, ck, mask=row)
        tl.store(v_base + slot * stride_vn, cv, mask=row)
        tl.store(s_base + slot, cs, mask=write)
        tl.store(i_base + slot, ci, mask=write)
        ck, cv, cs, ci = old_k, old_v, old_s, old_i


def push_token_triton(k_buf: Tensor, v_buf: Tensor, score_buf: Tensor, idx_buf: Tensor, k_new: Tensor,
                      v_new: Tensor, s_new: Tensor, chain: Tensor, t: int | Tensor, n_sinks: int) -> None:
    """Same contract as `push_token_ref`, one launch, no host sync. A compete ends the chain, so the kernel
    needs no special case for it: whatever it carries on afterwards is never written."""
    b, hkv, _, d = k_buf.shape
    assert k_buf.stride(-1) == v_buf.stride(-1) == k_new.stride(-1) == v_new.stride(-1) == 1
    assert d == triton.next_power_of_2(d), d
    # Triton launches on the current device, and a layer may live on another (the interpreter runs on the CPU)
    with torch.cuda.device(k_buf.device) if k_buf.is_cuda else nullcontext():
        _launch(k_buf, v_buf, score_buf, idx_buf, k_new, v_new, s_new, chain, t, n_sinks)


def _launch(k_buf, v_buf, score_buf, idx_buf, k_new, v_new, s_new, chain, t, n_sinks) -> None:
    b, hkv, _, d = k_buf.shape
    _push_kernel[(b * hkv,)](
        k_buf, v_buf, score_buf, idx_buf, k_new, v_new, s_new, chain,
        k_buf.stride(0), k_buf.stride(1), k_buf.stride(2),
        v_buf.stride(0), v_buf.stride(1), v_buf.stride(2),
        score_buf.stride(0), score_buf.stride(1),
        idx_buf.stride(0), idx_buf.stride(1),
        k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1),
        s_new.stride(0), s_new.stride(1),
        chain.shape[0], t, hkv, n_sinks, SKIP,
        HEAD_DIM=d, T_IN_MEMORY=isinstance(t, Tensor), num_warps=1,
    )


def push_token(k_buf: Tensor, v_buf: Tensor, score_buf: Tensor, idx_buf: Tensor, k_new: Tensor, v_new: Tensor,
               s_new: Tensor, chain: Tensor, t: int | Tensor, n_sinks: int) -> None:
    """Dispatcher: the Triton kernel on CUDA where triton is installed, the torch reference elsewhere (and under
    CASCADECTL_KERNELS=ref)."""
    if dispatch.push_path(k_buf) == "triton":
        push_token_triton(k_buf, v_buf, score_buf, idx_buf, k_new, v_new, s_new, chain, t, n_sinks)
    else:
        push_token_ref(k_buf, v_buf, score_buf, idx_buf, k_new, v_new, s_new, chain, t, n_sinks)
