"""engine/weight_pack.py: packed int4/int8 linears equal the dense product of their de-quantized weight, take the
dense path for many rows, refuse what they cannot pack; on the embedded model int4 re-grids within
LOSSLESS_STEPS and greedy decode is unchanged; `--weights` end to end."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import models
from engine import weight_pack as wp
from engine.errors import ConfigError
from tests.cli.fakes import invoke
from tests.engine.tiny import tiny_model

BOOK = Path(__file__).resolve().parents[2] / "data" / "pride_and_prejudice.txt"


def _linear(n: int, k: int, bias: bool = False, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.normal_(0, 1)
        if bias:
            lin.bias.normal_(0, 1)
    return lin


def _dequantized(lin: torch.nn.Linear, mode: str) -> torch.Tensor:
    """The weight the packed kernel multiplies by, from the module's own quantization, in fp32."""
    n, k = lin.weight.shape
    if mode == "int4":
        q, sz, _ = wp.quantize_int4(lin.weight)
        s = sz.float().permute(1, 0, 2)  # [N, K/32, 2]
        return ((q.float().reshape(n, k // 32, 32) - 8) * s[..., :1] + s[..., 1:]).reshape(n, k)
    q, scale = wp.quantize_int8(lin.weight)
    return q.float() * scale.float()[:, None]


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    # bf16 output: ~2^-8 of the largest value, as the dense bf16 F.linear's own rounding
    assert (y.float() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item() + 1e-3


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("n,k", [(64, 128), (16, 32), (48, 160), (1536, 576)])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_packed_equals_dense_product_of_dequantized(mode, n, k, rows):
    lin = _linear(n, k, bias=True)
    packed, _ = wp.pack_linear(lin, mode)
    x = torch.randn(1, rows, k).to(torch.bfloat16)
    ref = x.float() @ _dequantized(lin, mode).T + lin.bias.float()
    y = packed(x)
    assert y.shape == (1, rows, n) and y.dtype == torch.bfloat16
    _close(y, ref)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_many_rows_take_the_dense_weight(mode):
    lin = _linear(64, 128)
    packed, _ = wp.pack_linear(lin, mode)
    x = torch.randn(2, 150, 128).to(torch.bfloat16)  # 300 rows > MAX_PACKED_ROWS: exactly the dense F.linear
    assert torch.equal(packed(x), F.linear(x, lin.weight))
    assert packed.weight is lin.weight  # the dense weight is shared, not copied


def test_int8_awkward_shapes():
    for n, k in [(7, 40), (1, 8), (33, 64), (5, 24)]:
        lin = _linear(n, k)
        packed, _ = wp.pack_linear(lin, "int8")
        x = torch.randn(3, k).to(torch.bfloat16)
        _close(packed(x), x.float() @ _dequantized(lin, "int8").T)


def test_int4_regrid_of_a_grid_is_exact_and_of_random_weights_half_a_step():
    torch.manual_seed(0)
    q = torch.randint(0, 16, (32, 64)).float()
    q[:, 0], q[:, 32], q[:, 1], q[:, 33] = 0, 0, 15, 15  # every group spans the 16 levels, as Q4_1 blocks do
    on_grid = (q * 0.0625 - 0.5).to(torch.bfloat16)
    assert wp.quantize_int4(on_grid)[2] <= 0.01
    off_grid = torch.randn(32, 64).to(torch.bfloat16)
    assert 0.3 < wp.quantize_int4(off_grid)[2] <= 0.5 + 0.02


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_pack_linears_on_a_model(mode):
    model = tiny_model("qwen2").to(torch.bfloat16)  # qwen2: q/k/v biases
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        before = model(x).logits
        report = wp.pack_linears(model, mode)
        after = model(x).logits  # 9 rows <= MAX_PACKED_ROWS: the packed kernels
    assert report.mode == mode and report.packed == 2 * 7 and report.kept_dense == 0 and report.reason is None
    assert (report.max_regrid_error is not None) == (mode == "int4")
    assert report.bytes_added > 0
    assert isinstance(model.model.layers[0].self_attn.q_proj, wp.PackedLinear)
    assert not isinstance(model.lm_head, wp.PackedLinear)
    assert (after - before).abs().max().item() < 0.25 * before.abs().max().item()  # lossy on random weights
    assert wp.pack_linears(model, mode).reason == "the model is packed already"


def test_lossless_only_keeps_random_weights_dense():
    model = tiny_model("llama").to(torch.bfloat16)
    report = wp.pack_linears(model, "int4", lossless_only=True)
    assert report.mode == "native" and report.packed == 0 and report.kept_dense == 14 and "4-bit" in report.reason
    assert not any(isinstance(m, wp.PackedLinear) for m in model.modules())


def test_refusals(monkeypatch):
    fp16 = tiny_model("llama").to(torch.float16)
    assert "bf16 or fp32" in wp.pack_linears(fp16, "int8").reason
    assert "K = 48" in wp.pack_linears(tiny_model("llama", hidden_size=48, head_dim=8).to(torch.bfloat16),
                                       "int4").reason
    assert "N = 40" in wp.pack_linears(tiny_model("llama", intermediate_size=40).to(torch.bfloat16), "int4").reason
    assert "K = 36" in wp.pack_linears(tiny_model("llama", hidden_size=36, head_dim=6).to(torch.bfloat16),
                                       "int8").reason  # K = 5 or 33 crash torch's int8 kernel
    meta = tiny_model("llama").to(torch.bfloat16).to("meta")
    assert "for the CPU" in wp.pack_linears(meta, "int8").reason
    model = tiny_model("llama").to(torch.bfloat16)
    monkeypatch.delattr(torch, "_weight_int4pack_mm_for_cpu")
    report = wp.pack_linears(model, "int4")
    assert report.packed == 0 and "_weight_int4pack_mm_for_cpu" in report.reason
    assert not any(isinstance(m, wp.PackedLinear) for m in model.modules())
    with pytest.raises(ValueError):
        wp.pack_linears(model, "int2")


def test_resolve_weights():
    assert models.resolve_weights(" Auto ", "cpu", torch.float32) == "auto"
    assert models.resolve_weights("int4", "cpu", torch.bfloat16) == "int4"
    with pytest.raises(ConfigError, match="--weights must be one of"):
        models.resolve_weights("int3", "cpu", torch.bfloat16)
    assert models.resolve_weights("int8", "cpu", torch.float32) == "int8"
    with pytest.raises(ConfigError, match="needs --dtype bf16 or fp32"):
        models.resolve_weights("int8", "cpu", torch.float16)
    with pytest.raises(ConfigError, match="for the CPU"):
        models.resolve_weights("int4", "cuda", torch.bfloat16)


# ---------------------------------------------------------------------------------------------------- embedded model


def test_embedded_model_regrids_to_int4_within_bound(embedded_fp32):
    """The embedded model's layer weights come from Q4_1 (groups of 32 on a 16-level grid): int4 re-grids them
    within LOSSLESS_STEPS of a step (measured: 0.0463 at most over the 210 linears, of which 0.0435 is the bf16
    rounding of the dense weights themselves). The fp32 fixture holds the bf16 values exactly."""
    linears = wp.decoder_linears(embedded_fp32.model)
    errors = [wp.quantize_int4(lin.weight.to(torch.bfloat16))[2] for _, _, lin in linears]
    assert len(errors) == 30 * 7
    assert max(errors) <= wp.LOSSLESS_STEPS


@pytest.fixture(scope="module")
def embedded_bf16():
    return models.load_model(None, "cpu", "bf16")


def _greedy(model, ids, n, forced=None):
    out = model(ids, use_cache=True)
    past, logits, tokens = out.past_key_values, [out.logits[:, -1].float()], []
    for i in range(n):
        token = int(logits[-1].argmax(-1)) if forced is None else forced[i]
        tokens.append(token)
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[:, -1].float())
    return tokens, torch.cat(logits)


def test_embedded_greedy_decode_int4_equals_native(embedded_bf16, one_thread):
    """200 tokens of the novel read (dense path), then 32 greedy tokens: the same tokens with int4; with the
    native tokens forced, the logits (|max| 32) differ by at most 0.59 (measured; bf16 logits have steps of
    0.125 there)."""
    lm = embedded_bf16
    ids = torch.tensor([lm.tokenizer(BOOK.read_text(encoding="utf-8")[3000:4500])["input_ids"][:200]])
    with torch.no_grad():
        native, native_logits = _greedy(lm.model, ids, 32)
        report = wp.pack_linears(lm.model, "int4", lossless_only=True)
        assert report.packed == 210 and report.kept_dense == 0
        packed, _ = _greedy(lm.model, ids, 32)
        _, forced_logits = _greedy(lm.model, ids, 32, forced=native)
    assert packed == native
    assert (forced_logits - native_logits).abs().max().item() <= 1.0


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_fp32_rows_go_through_bf16(mode):
    """An fp32 linear's packed copy takes its rows rounded to bf16 and gives fp32 back: the product of the rounded
    rows with the de-quantized weight, within the kernel's bf16 output rounding."""
    lin = _linear(64, 128, bias=True).float()
    packed, _ = wp.pack_linear(lin, mode)
    x = torch.randn(1, 3, 128)
    y = packed(x)
    assert y.dtype == torch.float32 and y.shape == (1, 3, 64)
    _close(y, x.to(torch.bfloat16).float() @ _dequantized(lin, mode).T + lin.bias)
    many = torch.randn(40, 128)  # more than MAX_PACKED_ROWS: the fp32 weight, exactly
    assert torch.equal(packed(many), F.linear(many, lin.weight, lin.bias))


def test_pack_head_only_where_the_bf16_copy_is_exact():
    model = tiny_model("llama")  # fp32, random weights: not bf16 values
    assert wp.pack_head(model) == 0 and type(model.lm_head) is torch.nn.Linear
    with torch.no_grad():
        model.lm_head.weight.copy_(model.lm_head.weight.to(torch.bfloat16).float())
    before = model.lm_head
    added = wp.pack_head(model)
    head = model.lm_head
    assert added == head.weight.numel() * 2 and isinstance(head, wp.PackedLinear) and head.weight is before.weight
    h = torch.randn(1, 1, head.in_features)
    assert torch.equal(head(h), F.linear(h.to(torch.bfloat16), before.weight.to(torch.bfloat16)).float())
    many = torch.randn(1, 40, head.in_features)  # a chunk: the fp32 weight, exactly as before
    assert torch.equal(head(many), before(many))
    assert wp.pack_head(tiny_model("llama").to(torch.bfloat16)) == 0  # a bf16 model's head is bf16 already


@pytest.fixture(scope="module")
def embedded_fp32_own():
    return models.load_model(None, "cpu", "fp32")  # its own copy: the test packs it


def test_embedded_fp32_greedy_decode_int4_within_bf16_rounding(embedded_fp32_own, one_thread):
    """The fp32 model (`--dtype auto` on CPUs without AVX512) with `--weights auto`: int4 layers and a bf16 head
    copy, rows rounded to bf16. 200 tokens read, then 32 greedy tokens. With the native fp32 tokens forced the
    logits (|max| about 32) differ by at most 0.5 (measured 0.449; the bf16 model differs from fp32 by 0.620 on the
    same tokens), so greedy tokens can differ only where native's top two are within twice that: they are the
    same up to step 23 (margin 0.01), where the bf16 model turns too."""
    lm = embedded_fp32_own
    ids = torch.tensor([lm.tokenizer(BOOK.read_text(encoding="utf-8")[3000:4500])["input_ids"][:200]])
    with torch.no_grad():
        native, native_logits = _greedy(lm.model, ids, 32)
        report = wp.pack_linears(lm.model, "int4", lossless_only=True)
        assert report.packed == 210 and report.kept_dense == 0 and report.head
        packed, _ = _greedy(lm.model, ids, 32)
        _, forced_logits = _greedy(lm.model, ids, 32, forced=native)
    bound = 0.5
    assert (forced_logits - native_logits).abs().max().item() <= bound
    first = next((i for i, (a, b) in enumerate(zip(packed, native)) if a != b), 32)
    assert first >= 16  # measured: 23
    if first < 32:  # the same tokens before it, so its logits are the forced ones: a near-tie of native's top two
        top2 = native_logits[first].topk(2).values
        assert (top2[0] - top2[1]).item() < 2 * bound


# ---------------------------------------------------------------------------------------------------- --weights CLI


def test_cli_weights_auto_int4_on_embedded_bf16(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text(BOOK.read_text(encoding="utf-8")[5000:6500], encoding="utf-8")
    common = ["summarize", str(text), "--dtype", "bf16", "--max-tokens", "4", "--temperature", "0", "--json"]
    docs = {}
    for weights in ("native", "auto", "int8"):
        result = invoke([*common, "--weights", weights])
        assert result.exit_code == 0, result.output
        docs[weights] = json.loads(result.stdout)
    assert docs["native"]["record"]["weights"] == "native"
    assert docs["auto"]["record"]["weights"] == "int4"  # from the Q4_1 GGUF: measured lossless
    assert docs["int8"]["record"]["weights"] == "int8"
    result = invoke(["summarize", str(text), "--dtype", "fp32", "--max-tokens", "2", "--json"])  # auto, fp32
    assert result.exit_code == 0 and json.loads(result.stdout)["record"]["weights"] == "int4"
    result = invoke(["summarize", str(text), "--dtype", "fp16", "--max-tokens", "2", "--json"])  # auto, fp16
    assert result.exit_code == 0 and json.loads(result.stdout)["record"]["weights"] == "native"
    result = invoke(["ppl", str(text), "--dtype", "fp32", "--json"])  # never decodes: auto packs nothing
    assert result.exit_code == 0 and json.loads(result.stdout)["model"]["weights"] == "native"


@pytest.mark.parametrize("args,message", [
    (["--weights", "int3"], "error: --weights must be one of auto, native, int4, int8 (got 'int3')"),
    (["--weights", "int4", "--dtype", "fp16"], "error: --weights int4 needs --dtype bf16 or fp32 (got float16)"),
])
@pytest.mark.parametrize("command", ["summarize", "ppl"])
def test_cli_bad_weights(tmp_path, command, args, message):
    text = tmp_path / "a.txt"
    text.write_text("some text " * 20, encoding="utf-8")
    result = invoke([command, str(text), "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [message]
