"""Question-guided retention: captured queries, exact score increments, and an effect on what is kept."""
import torch

from engine.config import CacheConfig
from engine.retention import QuestionGuide, question_attention
from engine.runner import Runner
from engine.reading import ingest
from tests.engine.tiny import tiny_model

CONFIG = CacheConfig(cache_size=32, cascades=4, sinks=4, stride=8, beta=0.9)
PREFIX = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(1)).tolist()
SPAN = (3, 10)  # straddles the two prefix chunks of 8
INPUT = torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(2)).tolist()


def _run(model, weight=None, record=None, config=CONFIG):
    runner = Runner(model, config, n_sinks=len(PREFIX))
    if weight is None:
        ingest(runner, PREFIX, [INPUT])
        return runner, None
    guide = QuestionGuide(runner, SPAN, weight)
    if record is not None:
        inner = guide.guide

        def guide_recorded(layer, k_all, scores):
            out = inner(layer, k_all, scores)
            record.append((layer, k_all.clone(), scores.clone(), out.clone(), runner.cache.n_new))
            return out

        guide.guide = guide_recorded
    with guide:
        ingest(runner, PREFIX, [INPUT])
    assert runner.query_hook is None and runner.score_hook is None  # the hooks are removed on exit
    return runner, guide


def test_captured_queries_are_the_question_rows_before_rope():
    model = tiny_model("llama", seed=3)
    runner, guide = _run(model, weight=1.0)
    runner.close()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor([PREFIX])))
        q = attn.q_proj(x).view(1, len(PREFIX), -1, attn.head_dim).transpose(1, 2)  # [B, Hq, T, D]
    torch.testing.assert_close(guide.queries[0], q[:, :, SPAN[0]:SPAN[1]])
    assert all(qs.shape == (1, 6, SPAN[1] - SPAN[0], 16) for qs in guide.queries)


def _naive_increment(q_pre, k_all, n_drop, n_new, weight, beta, theta):
    """float64, loops over heads: rotate at K + j by the RoPE formula, softmax, mean over Q, max per KV group."""
    q_pre, k_all = q_pre.double()[0], k_all.double()[0]
    hq, n_q, d = q_pre.shape
    hkv, n_k = k_all.shape[0], k_all.shape[1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(n_k, n_k + n_q, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    q = q_pre * cos + torch.cat([-q_pre[..., d // 2:], q_pre[..., : d // 2]], -1) * sin
    out = torch.zeros(hkv, n_k, dtype=torch.float64)
    g = hq // hkv
    for h in range(hq):
        p = torch.softmax(q[h] @ k_all[h // g].T / d**0.5, dim=-1).mean(0)
        out[h // g] = torch.maximum(out[h // g], p)
    return weight * (1 - beta**n_new) * out[:, n_drop:]


def test_score_increments_equal_naive_fp64():
    model = tiny_model("llama", seed=3)
    record = []
    runner, guide = _run(model, weight=2.5, record=record)
    runner.close()
    theta = model.config.rope_parameters["rope_theta"]
    guided = [r for r in record if not torch.equal(r[2], r[3])]
    assert len(guided) == 2 * (len(INPUT) // CONFIG.stride)  # every input chunk, every layer; not the prefix
    for layer, k_all, before, after, n_new in guided:
        added = (after - before).double()[0]
        assert (added >= 0).all()
        expected = _naive_increment(guide.queries[layer], k_all, k_all.shape[2] - before.shape[2], n_new, 2.5,
                                    CONFIG.beta, theta)
        torch.testing.assert_close(added, expected, atol=1e-6, rtol=1e-4)


def test_question_attention_reduces_like_the_cache():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 6, 3, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g)
    full = torch.softmax(q.view(1, 2, 9, 8) @ k.transpose(-1, -2) * 8**-0.5, -1).view(1, 2, 3, 3, 20).mean(3)
    torch.testing.assert_close(question_attention(q, k, 8**-0.5, "max"), full.amax(2))
    torch.testing.assert_close(question_attention(q, k, 8**-0.5, "mean"), full.mean(2))
    assert (question_attention(q, k, 8**-0.5).sum(-1) >= 1 - 1e-6).all()  # max of distributions: mass >= 1


def test_question_changes_what_is_kept_and_weight_zero_does_not():
    model = tiny_model("llama", seed=3)
    kept = {}
    for name, weight in [("plain", None), ("zero", 0.0), ("guided", 1.0)]:
        runner, _ = _run(model, weight=weight)
        kept[name] = [runner.cache.token_index(layer) for layer in range(2)]
        runner.close()
    assert all(torch.equal(a, b) for a, b in zip(kept["plain"], kept["zero"]))
    assert any(not torch.equal(a, b) for a, b in zip(kept["plain"], kept["guided"]))
    n_past = kept["guided"][0].shape[-1]
    assert n_past == len(PREFIX) + CONFIG.cache_size  # same budget either way: only the choice differs
