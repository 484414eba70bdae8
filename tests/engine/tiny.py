"""Tiny random-weight models of each supported family (no download), fp32, with GQA."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


def tiny_model(family: str = "llama", seed: int = 0, max_positions: int = 512, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=max_positions, tie_word_embeddings=False,
    )
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    config = CONFIGS[family](**kwargs)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    if family == "qwen2":  # random q/k/v biases so that the bias path is exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model
