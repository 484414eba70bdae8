"""Tiny random-weight models of each supported family (no download), fp32, with GQA.

`VARIANTS` adds, per family, what makes it differ from llama at sizes this small: sliding windows shorter than
the tests' inputs, soft-caps low enough that tanh bends the logits, multipliers away from 1, NoPE layers, partial
rotary, a few experts."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

WINDOW = 24  # shorter than the 100-token inputs of the exactness tests, so local layers drop keys

VARIANTS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "mistral-window": {"sliding_window": WINDOW},  # Mistral 7B v0.1: a window on every layer
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {"sliding_window": WINDOW, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 2.0,
               "final_logit_softcapping": 5.0, "initializer_range": 0.15},  # logits large enough for tanh to bend
    "gemma3_text": {"sliding_window": WINDOW, "query_pre_attn_scalar": 24,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {},
    "phi3-partial": {"partial_rotary_factor": 0.5},  # Phi-4-mini rotates 3/4 of each head
    "granite": {"attention_multiplier": 0.3, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                "logits_scaling": 4.0},
    "olmo2": {},
    "smollm3": {"no_rope_layer_interval": 2, "use_sliding_window": True, "sliding_window": WINDOW},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
}


def tiny_model(family: str = "llama", seed: int = 0, max_positions: int = 512, **overrides):
    """`family` is a model_type or one of VARIANTS' `<model_type>-<variant>` names."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=max_positions, tie_word_embeddings=False,
        pad_token_id=None, bos_token_id=None, eos_token_id=None,  # some defaults lie outside the tiny vocab
    )
    kwargs.update(VARIANTS.get(family, {}))
    kwargs.update(overrides)
    config = AutoConfig.for_model(family.split("-")[0], **kwargs)
    # sdpa has no soft-capping (transformers 5.17 runs gemma2 on it regardless): eager is then the reference
    capped = getattr(config, "attn_logit_softcapping", None) is not None
    impl = "sdpa" if MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._supports_sdpa and not capped else "eager"
    config._attn_implementation = impl
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    for layer in model.model.layers:
        attn = layer.self_attn
        if family == "qwen2":  # random q/k/v biases so that the bias path is exercised
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
        for name in ("q_norm", "k_norm"):  # norms start as the identity: make per-head and whole-width differ
            norm = getattr(attn, name, None)
            if norm is not None:
                with torch.no_grad():
                    norm.weight.add_(0.3 * torch.randn_like(norm.weight))
    return model
