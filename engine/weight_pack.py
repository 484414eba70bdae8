"""Packed low-bit copies of the decoder layers' linear weights, for CPU decode (issue 19, item 2).

A decode step multiplies one row per linear by the whole weight, so it is bound by reading the weights (135M
bf16 weights a token for the embedded model, about half of a 4096-cache step on 2 cores). torch's CPU kernels for
packed weights read a quarter (int4) or half (int8) of those bytes and are 3-5x faster than a bf16 `F.linear`
for one row, but 2.5-3.5x slower for prefill chunks of hundreds of rows. `PackedLinear` therefore keeps the dense
bf16 weight and adds the packed form, and picks the kernel by the number of rows it is given: the packed one for
at most `MAX_PACKED_ROWS`, the dense one otherwise (prefill, so the KV cache a chunk writes is the dense one's).

- int4: groups of `GROUP` = 32 along K, 16 levels between the group's min and max (asymmetric), scale and zero in
  bf16: W' = (q - 8)·scale + zero. Lossy for a bf16 original; for weights de-quantized from a GGUF's Q4_1 (the
  embedded model's) the group already lies on such a grid, and the re-grid error is measured and reported
  (`max_regrid_error`, in steps of the group). `lossless_only` packs only the linears whose error is at most
  `LOSSLESS_STEPS` and keeps the others dense.
- int8: per output channel, symmetric, scale in bf16: W' = q·scale, q in -127..127. The conservative choice for
  weights that came as bf16.

Memory: the dense weights stay (prefill uses them), so packing adds 0.625 bytes a weight for int4 (half a byte
plus 4 bytes of scale and zero per 32) and 1 byte (plus 2 per output channel) for int8: 66 MB and 106 MB for the
106M layer weights of the embedded model.

On an fp32 model (`--dtype auto` on CPUs without AVX512) the packed kernels take the rows rounded to bf16: on a
2-core AVX2 EPYC the 210 one-row products of the embedded model take 16.0 ms in int4 against 54.7 ms in fp32
(docs/BENCHMARKS.md, "CPU decode with packed weights").

`pack_linears` refuses, packing nothing and saying why in its report, on a non-CPU model, a dtype other
than bf16 or fp32, a K that is not a multiple of 32 or an N not of 16 (int4), a K not a multiple of 8 (int8), or a
torch without the kernels; callers fall back to the dense weights. The embedding is left alone; the LM head of an
fp32 model gets an exact bf16 copy for decode rows (`pack_head`), that of a bf16 model is left as it is."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("int4", "int8")
GROUP = 32  # int4 group length along K
# _weight_int8pack_mm crashes the process (segmentation fault, torch 2.13.0+cpu, AVX2) for K = 5 or 33, not for
# the multiples of 8 tried (8 to 64): K must be one
INT8_K_MULTIPLE = 8
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
PACKED_INPUTS = (torch.bfloat16, torch.float32)  # model dtypes the packed kernels serve (fp32 through bf16 rows)
MAX_PACKED_ROWS = 16  # rows of x (flattened) up to which the packed kernel runs; the dense one above
# int4 re-grid error (in steps of the group) taken as "lossless up to bf16 rounding": the embedded model's Q4_1
# weights measure at most 0.046 (tests/engine/test_weight_pack.py), of which 0.043 is the bf16 rounding of the
# dense weights themselves; weights not on such a grid measure up to half a step (rounding to the nearest level)
LOSSLESS_STEPS = 0.05


@dataclass(frozen=True)
class PackReport:
    """What `pack_linears` did."""

    mode: str  # "int4", "int8", or "native" when nothing was packed
    packed: int  # linears replaced by a PackedLinear
    kept_dense: int  # linears left as they were (lossless_only: re-grid error above LOSSLESS_STEPS)
    bytes_added: int  # packed weights and their scales, beside the dense weights that stay
    max_regrid_error: float | None  # int4: the largest |W' - W| over the packed linears, in steps of its group
    reason: str | None = None  # why nothing was packed
    head: bool = False  # the LM head got a bf16 copy for decode (pack_head)


class PackedLinear(nn.Linear):
    """An nn.Linear (same `weight`, `bias`, `in_features`, `out_features`) that also holds a packed copy of its
    weight and multiplies at most MAX_PACKED_ROWS rows of bf16 or fp32 CPU input through it.

    torch's packed kernels take bf16 rows; fp32 rows are rounded to bf16 on the way in and the product comes back
    in fp32 (the rounding a bf16 model's linears make, measured in tests/engine/test_weight_pack.py)."""

    def __init__(self, linear: nn.Linear, mode: str, packed: Tensor, scales: Tensor) -> None:
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a new weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.mode = mode
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales", scales, persistent=False)  # int4: scales and zeros [K/32, N, 2]; int8: [N]

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if rows > MAX_PACKED_ROWS or rows == 0 or x.dtype not in PACKED_INPUTS or x.device != self.packed.device:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features).to(torch.bfloat16).contiguous()
        if self.mode == "int4":
            y = torch._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales)
        elif self.mode == "int8":
            y = torch._weight_int8pack_mm(flat, self.packed, self.scales)
        else:  # "bf16": the weight's exact bf16 copy (pack_head)
            y = F.linear(flat, self.packed)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed={self.mode}"


def kernels_missing(mode: str) -> list[str]:
    """The torch ops `mode` needs that this torch build lacks."""
    need = {"int4": ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
            "int8": ("_weight_int8pack_mm",)}[mode]
    return [name for name in need if not hasattr(torch, name)]


def quantize_int4(weight: Tensor) -> tuple[Tensor, Tensor, float]:
    """(q int32 [N, K] in 0..15, scales_zeros bf16 [K/32, N, 2], max re-grid error in steps) of `weight` [N, K].

    16 levels from the group's min to its max. The kernel reads scale and zero in bf16, whose rounding moves the
    grid by up to ~8·2^-9 of a step at its ends; per group, the pair of bf16 values next to the exact scale and
    zero (3 x 3 candidates) with the smallest largest error is kept, and q is rounded against that stored pair, so
    the error reported is that of the weight the kernel multiplies by. On the embedded model's Q4_1 weights this
    takes the largest error from 0.093 of a step (nearest bf16 scale and zero) to 0.046, against 0.043 for an fp32
    scale and zero (which is the bf16 rounding of the dense weights themselves)."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // GROUP, GROUP)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    exact = (hi - lo) / 15
    step = torch.where(exact > 0, exact, torch.ones_like(exact))
    level = torch.round((w - lo) / step).sub_(8)  # q - 8 on the exact grid
    best = scale = zero = None
    for s in _bf16_around(exact):
        for z in _bf16_around(lo + 8 * exact):
            error = torch.addcmul(z - w, level, s).abs_().amax(-1, keepdim=True)
            if best is None:
                best, scale, zero = error, s, z
                continue
            better = error < best
            best, scale, zero = torch.minimum(error, best), torch.where(better, s, scale), torch.where(better, z, zero)
    # q against the pair kept, which can only lower the error; a constant group (scale 0) is W' = zero
    div = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale > 0, torch.clamp(torch.round((w - zero) / div + 8), 0, 15), torch.full_like(w, 8))
    error = torch.addcmul(zero - w, q - 8, scale).abs_().div_(step).max().item() if w.numel() else 0.0
    scales_zeros = torch.cat([scale, zero], dim=-1).permute(1, 0, 2).contiguous().to(torch.bfloat16)  # [K/32, N, 2]
    return q.reshape(n, k).to(torch.int32), scales_zeros, error


def _bf16_around(x: Tensor) -> list[Tensor]:
    """The bf16 value nearest to each of `x` and its two neighbours, as fp32."""
    b = x.to(torch.bfloat16)
    return [torch.nextafter(b, torch.full_like(b, -float("inf"))).float(), b.float(),
            torch.nextafter(b, torch.full_like(b, float("inf"))).float()]


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 [N, K] in -127..127, scales bf16 [N]) of `weight` [N, K]: symmetric per output channel."""
    w = weight.detach().float()
    scale = (w.abs().amax(-1) / 127).to(torch.bfloat16).float()
    step = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / step[:, None]), -127, 127)
    return q.to(torch.int8), scale.to(torch.bfloat16)


def pack_linear(linear: nn.Linear, mode: str) -> tuple[PackedLinear, float | None]:
    """`linear` as a PackedLinear, and (int4) its re-grid error in steps. Checks nothing: see pack_linears."""
    if mode == "int4":
        q, scales, error = quantize_int4(linear.weight)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        return PackedLinear(linear, mode, packed, scales), error
    q, scales = quantize_int8(linear.weight)
    return PackedLinear(linear, mode, q, scales), None


def decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear inside the decoder layers (`model.model.layers`): the
    attention and MLP projections; the embedding and the LM head are outside them."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    found = []
    for layer in layers:
        for parent in layer.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    found.append((parent, name, child))
    return found


def pack_linears(model: nn.Module, mode: str, lossless_only: bool = False) -> PackReport:
    """Replace the decoder layers' linears of `model` (a CPU bf16 or fp32 transformers CausalLM) by PackedLinears.

    `mode` is int4 or int8; `lossless_only` (int4) keeps dense every linear whose re-grid error exceeds
    LOSSLESS_STEPS. Packs nothing, with the reason in the report, when the model cannot be packed."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    linears = decoder_linears(model)

    def refuse(reason: str) -> PackReport:
        return PackReport("native", 0, len(linears), 0, None, reason)

    if not linears:
        return refuse("no linear layers found in model.model.layers")
    if missing := kernels_missing(mode):
        return refuse(f"torch {torch.__version__} lacks {', '.join(missing)}")
    for _, name, linear in linears:
        w = linear.weight
        if w.device.type != "cpu":
            return refuse(f"packed weights are for the CPU; {name} is on {w.device}")
        if w.dtype not in PACKED_INPUTS:
            return refuse(f"packed weights need bf16 or fp32 weights; {name} is "
                          f"{str(w.dtype).removeprefix('torch.')}")
        if mode == "int4" and w.shape[1] % GROUP:
            return refuse(f"int4 packs groups of {GROUP} along K; {name} has K = {w.shape[1]}")
        if mode == "int4" and w.shape[0] % INT4_N_MULTIPLE:
            return refuse(f"torch's int4 packing needs N a multiple of {INT4_N_MULTIPLE}; {name} has "
                          f"N = {w.shape[0]}")
        if mode == "int8" and w.shape[1] % INT8_K_MULTIPLE:
            return refuse(f"torch's int8 kernel needs K a multiple of {INT8_K_MULTIPLE}; {name} has "
                          f"K = {w.shape[1]}")
        if isinstance(linear, PackedLinear):
            return refuse("the model is packed already")
    packed = kept = added = 0
    worst = None
    with torch.no_grad():
        for parent, name, linear in linears:
            module, error = pack_linear(linear, mode)
            if lossless_only and error is not None and error > LOSSLESS_STEPS:
                kept += 1
                continue
            setattr(parent, name, module)
            packed += 1
            added += module.packed.numel() * module.packed.element_size() + module.scales.numel() * 2
            if error is not None:
                worst = error if worst is None else max(worst, error)
    if not packed:
        return PackReport("native", 0, kept, 0, None,
                          f"no linear re-grids to int4 within {LOSSLESS_STEPS} of a step (not from a 4-bit GGUF)")
    head = pack_head(model)
    return PackReport(mode, packed, kept, added + head, worst, head=head > 0)


def pack_head(model: nn.Module) -> int:
    """Give the LM head of an fp32 CPU model a bf16 copy of its weight for decode rows, where that copy is exact
    (every weight is a bf16 value: a model converted from a GGUF or shipped in bf16, loaded in fp32); the bytes
    added, 0 when nothing was done. The copy halves what one decode row reads (the embedded model's tied head is
    49,152 x 576: 113 MB in fp32); prefill and `ppl` chunks keep the fp32 weight."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or head.bias is not None:
        return 0
    w = head.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return 0
    with torch.no_grad():
        copy = w.to(torch.bfloat16)
        if not torch.equal(copy.float(), w):
            return 0
        model.lm_head = PackedLinear(head, "bf16", copy, copy.new_empty(0))
    return copy.numel() * copy.element_size()
