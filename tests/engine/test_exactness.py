"""With nothing evicted, every policy reproduces the model's own transformers forward; scores are the exact EMA."""
import pytest
import torch

from engine.config import CacheConfig
from engine.runner import Runner
from engine.families import SUPPORTED_FAMILIES
from tests.engine.tiny import VARIANTS, tiny_model

FAMILIES = list(VARIANTS)  # every supported model_type, and a few second configurations (windows, partial RoPE)


def _chunked_logits(model, ids, config: CacheConfig):
    with Runner(model, config) as runner:
        outs = [runner.logits(runner.step(ids[:, i : i + config.stride])) for i in range(0, ids.shape[1], config.stride)]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["full", "sink", "cascade"])
@pytest.mark.parametrize("stride", [1, 7, 64, 100])
def test_no_eviction_equals_transformers_forward(family, policy, stride):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(1))
    expected = model(ids).logits
    got = _chunked_logits(model, ids, CacheConfig(policy=policy, cache_size=128, cascades=4, sinks=4, stride=stride))
    assert (got - expected).abs().max().item() <= 1e-4
    assert "forward" not in model.model.layers[0].self_attn.__dict__  # the patch is gone


def test_every_supported_family_is_tested():
    assert {name.split("-")[0] for name in FAMILIES} == set(SUPPORTED_FAMILIES)


def test_patch_removed_after_error():
    model = tiny_model()
    with pytest.raises(RuntimeError):
        with Runner(model, CacheConfig(cache_size=128, stride=16)) as runner:
            runner.step(torch.zeros(1, 4, dtype=torch.long))
            raise RuntimeError("boom")
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)


def _naive_ema_scores(model, ids, beta):
    """fp64, per query: score_j <- beta score_j + (1 - beta) mean_g p(m, j), from the model's own attention."""
    probs = {}
    hooks = []
    cfg = model.config
    g = cfg.num_attention_heads // cfg.num_key_value_heads

    def grab(layer):
        def hook(module, args, kwargs, output):
            probs[layer] = output[1].double()  # eager attention returns the probabilities [B, Hq, T, T]
        return hook

    model.config._attn_implementation = "eager"
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.register_forward_hook(grab(i), with_kwargs=True))
    try:
        model(ids, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
        model.config._attn_implementation = "sdpa"
    scores = {}
    for layer, p in probs.items():
        b, hq, t, _ = p.shape
        p = p.view(b, hq // g, g, t, t).mean(dim=2)  # [B, Hkv, T, T]
        s = torch.zeros(b, hq // g, t, dtype=torch.float64)
        for m in range(t):
            s = beta * s + (1 - beta) * p[:, :, m]
        scores[layer] = s
    return scores


@pytest.mark.parametrize("stride", [1, 5, 16, 48])
def test_prefill_scores_equal_naive_fp64_ema(stride):
    """With `mean` over the query heads the scores do not depend on the stride: compare to a per-query EMA."""
    model = tiny_model("llama", seed=3)
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(2))
    beta, n_sinks = 0.9, 3
    config = CacheConfig(cache_size=64, cascades=4, sinks=n_sinks, stride=stride, beta=beta, head_reduce="mean")
    naive = _naive_ema_scores(model, ids, beta)
    with Runner(model, config) as runner:
        for i in range(0, 48, stride):
            runner.step(ids[:, i : i + stride])
        cache = runner.cache
        for layer, expected in naive.items():
            # every token is cached and none evicted; sink columns are not scored
            assert cache.token_index(layer)[0, 0].tolist() == list(range(48))
            got = cache.cached_scores(layer).double()
            torch.testing.assert_close(got, expected[:, :, n_sinks:], rtol=1e-5, atol=1e-7)


def test_positions_never_exceed_model_limit():
    model = tiny_model(max_positions=64)
    config = CacheConfig(cache_size=40, cascades=4, sinks=4, stride=16)
    config.check_positions(4, 64)
    with Runner(model, config) as runner:
        for i in range(0, 2000, 16):  # far past the limit: slot positions stay below S + N + L
            runner.step(torch.randint(0, 256, (1, 16)))
            assert runner.cache.n_past + 16 <= 64


@pytest.mark.parametrize("policy", ["sink", "cascade"])
@pytest.mark.parametrize("stride", [16, 50, 300])
def test_embedded_model_no_eviction_equals_its_forward(embedded_fp32, policy, stride):
    lm = embedded_fp32
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " * 6
    ids = torch.tensor([lm.tokenizer.encode(text, add_special_tokens=False)[:120]])
    expected = lm.model(ids).logits
    config = CacheConfig(policy=policy, cache_size=512, cascades=4, sinks=8, stride=stride)
    got = _chunked_logits(lm.model, ids, config)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_matches_the_fp32_forward(family):
    """On CUDA with D = 64: fp32 (torch paths) within 1e-4 of the forward; bf16 (the Triton kernels on plain
    layers, the torch paths on capped and windowed ones) no further from the fp32 forward than transformers' own
    bf16 forward is, up to a bf16 rounding of the logits."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = tiny_model(family, head_dim=64)
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(1))
    expected = model(ids).logits
    model, ids = model.cuda(), ids.cuda()
    for stride in (1, 7, 64, 100):
        config = CacheConfig(policy="cascade", cache_size=128, cascades=4, sinks=4, stride=stride)
        assert (_chunked_logits(model, ids, config).cpu() - expected).abs().max().item() <= 1e-4
    model = model.to(torch.bfloat16)
    own_error = (model(ids).logits.float().cpu() - expected).abs().max().item()
    for stride in (1, 7, 64, 100):
        config = CacheConfig(policy="cascade", cache_size=128, cascades=4, sinks=4, stride=stride)
        error = (_chunked_logits(model, ids, config).cpu() - expected).abs().max().item()
        assert error <= 2 * own_error + 1e-2 * expected.abs().max().item(), (stride, error, own_error)
