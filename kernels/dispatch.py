"""Which implementation of each kernel family runs: the one place that reads CASCADECTL_KERNELS and asks where
the Triton kernels can run.

Every family has a torch reference beside its kernels. The entry points ask here once per call and branch:

    attention_path(q, k)  chunk_attention, chunk_attention_paged: "ref" (forced), "cpu" (torch's fused CPU
                          kernels), "triton" (CUDA, 16-bit, head dim 64/128) or "torch" (another device or dtype:
                          SDPA without scores, the reference with them)
    rope_path(x, cos)     rotate_queries: "triton" (CUDA, 16-bit, head dim 32-256) or "torch"
    push_path(k_buf)      push_token: "triton" (CUDA) or "ref"
    graph_path(device)    Runner.decode, AnswerBatch.decode: "graph" (CUDA: a decode step captured once, replayed)
                          or "eager"
    shared_prefix_path(q, k_doc, n_tail, softcap, window)
                          shared_prefix_attention: "flash" (torch's flash kernels on CUDA or the CPU, merged by
                          log-sum-exp) or "torch" (the stacked form)

CASCADECTL_KERNELS=ref forces the torch references everywhere. The variable is read on the first question and
kept for the process (the entry points run once per layer and step); `use_reference` overrides it for a block,
which is how tests switch paths after the first call.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor

from ._triton import triton

ENV = "CASCADECTL_KERNELS"
_forced: bool | None = None  # None until the environment is read (or `use_reference` sets it)


def wants_reference(environ: Mapping[str, str]) -> bool:
    """Whether an environment asks for the torch references: CASCADECTL_KERNELS=ref."""
    return environ.get(ENV) == "ref"


def reference_only() -> bool:
    """CASCADECTL_KERNELS=ref, read from the environment once per process (or as `use_reference` says)."""
    global _forced
    if _forced is None:
        _forced = wants_reference(os.environ)
    return _forced


@contextmanager
def use_reference(flag: bool = True) -> Iterator[None]:
    """Inside the block the torch references run (flag True) or the kernels where they can (False), whatever
    CASCADECTL_KERNELS says; afterwards the previous choice holds again."""
    global _forced
    before = _forced
    _forced = flag
    try:
        yield
    finally:
        _forced = before


def triton_supports(q: Tensor, k: Tensor) -> bool:
    """The Triton attention kernels' domain: CUDA, 16-bit floats, head dim 64 or 128, and triton importable."""
    return (
        triton is not None
        and q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and k.dtype == q.dtype
        and q.shape[-1] in (64, 128)
    )


def attention_path(q: Tensor, k: Tensor) -> Literal["ref", "cpu", "triton", "torch"]:
    """Where a chunk's attention over keys like `k` runs (q [B, Hq, L, D])."""
    if reference_only():
        return "ref"
    if q.device.type == "cpu":
        return "cpu"
    if triton_supports(q, k):
        return "triton"
    return "torch"


def rope_path(x: Tensor, cos: Tensor) -> Literal["triton", "torch"]:
    """Where a chunk's queries x [B, H, T, D] are rotated with tables like `cos`."""
    if (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and cos.dtype == x.dtype
            and x.shape[-1] in (32, 64, 128, 256) and not reference_only()):
        return "triton"
    return "torch"


def push_path(k_buf: Tensor) -> Literal["triton", "ref"]:
    """Where a decoded token is pushed through the cascade's rings held in buffers like `k_buf`."""
    return "triton" if k_buf.is_cuda and triton is not None and not reference_only() else "ref"


def graph_path(device: torch.device) -> Literal["graph", "eager"]:
    """Whether decode steps on `device` may be captured and replayed as a CUDA graph (engine/decode_graph.py):
    on CUDA, unless CASCADECTL_KERNELS=ref asks for the plain torch references step by step."""
    return "graph" if device.type == "cuda" and torch.cuda.is_available() and not reference_only() else "eager"


def shared_prefix_path(q: Tensor, k_doc: Tensor, n_tail: int, softcap: float | None,
                       window: int | None) -> Literal["flash", "torch"]:
    """Where several rows' attention over a shared prefix like `k_doc` (kernels/shared_attention.py) runs: torch's
    flash kernels on CUDA for 16-bit inputs with a head dim that is a multiple of 8 up to 256, on the CPU for
    float32 or bf16, with no cap and no window that cuts; the stacked torch form otherwise."""
    if reference_only() or softcap is not None or q.dtype != k_doc.dtype:
        return "torch"
    if window is not None and k_doc.shape[2] + n_tail > window:
        return "torch"
    if q.is_cuda:
        ok = q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
    else:
        ok = q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
    return "flash" if ok else "torch"
