"""Tiny GGUF files written on the spot with the `gguf` package, from tiny random transformers models.

`write_gguf` lays a model's weights out the way llama.cpp's converter does (its tensor names from gguf's own
name map, llama's q/k rows permuted into llama.cpp's rotary order, the output matrix left out when tied) with a
256-token byte-level vocabulary, so that a file loads through transformers' GGUF reader like one from the wild.
`GGUF_ARCH` names each family as a GGUF spells it. `build_gguf` writes raw header bytes for hostile files.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def byte_tokens() -> list[str]:
    """The 256 byte-level BPE symbols (GPT-2's printable spelling of each byte), one token per byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)]


def _llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp stores each head's rotary pairs interleaved; transformers' reader undoes exactly this
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, qtype: str = "F32", name: str = "tiny test model",
               chat_template: str | None = CHAT_TEMPLATE, lie: dict | None = None,
               extra: dict | None = None) -> Path:
    """Write `model` (a tiny llama/qwen2/qwen3 *ForCausalLM, vocab 256) as a GGUF whose 2-D weights are `qtype`.

    Norms and biases stay F32 as llama.cpp keeps them. `lie` replaces metadata values written under the
    architecture's prefix (e.g. {"embedding_length": 1 << 20}) while the tensors stay as they are; `extra` adds
    tensors {gguf name: (numpy array, raw ggml type name or None)}. Returns `path`."""
    import gguf

    config = model.config
    arch = GGUF_ARCH[config.model_type]
    gguf_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(gguf_arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    fields = {
        "context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads, "attention.head_count_kv": config.num_key_value_heads,
        "attention.key_length": config.head_dim, "attention.value_length": config.head_dim,
        "rope.dimension_count": config.head_dim, "rope.freq_base": float(config.rope_parameters["rope_theta"]),
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps), "vocab_size": config.vocab_size,
    }
    fields.update(lie or {})
    for key, value in fields.items():
        add = writer.add_float32 if isinstance(value, float) else writer.add_uint32
        add(f"{arch}.{key}", value)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    tokens = byte_tokens()
    assert config.vocab_size == len(tokens), "the byte vocabulary has 256 tokens"
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    writer.add_token_scores([0.0] * len(tokens))  # no merges: transformers derives them (none here)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for tensor_name, (data, raw) in (extra or {}).items():
        writer.add_tensor(tensor_name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, raw) if raw else None)

    quant = getattr(gguf.GGMLQuantizationType, qtype)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        assert gguf_name is not None, hf_name
        data = tensor.detach().float().numpy().copy()
        if arch == "llama" and base.endswith("self_attn.q_proj"):
            data = _llama_permute(data, config.num_attention_heads)
        elif arch == "llama" and base.endswith("self_attn.k_proj"):
            data = _llama_permute(data, config.num_key_value_heads)
        if data.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(f"{gguf_name}.{suffix}", gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(f"{gguf_name}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def as_converted(model, qtype: str):
    """`model` as the cache holds a `qtype` file of it: every 2-D weight quantized and de-quantized, then every
    parameter rounded to bfloat16 (the cache's dtype for a quantized file) and back to float32."""
    import gguf

    quant = getattr(gguf.GGMLQuantizationType, qtype)
    with torch.no_grad():
        for _, param in model.named_parameters():
            data = param.detach().float()
            if param.ndim == 2:
                data = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data.numpy(), quant), quant))
            param.copy_(data.to(torch.bfloat16).float())
    return model


# --- raw headers, for hostile files ----------------------------------------------------------------------------


def gguf_string(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def build_gguf(kvs: list[bytes] = (), tensors: list[bytes] = (), data: bytes = b"", version: int = 3,
               tensor_count: int | None = None, kv_count: int | None = None, magic: bytes = b"GGUF",
               alignment: int = 32) -> bytes:
    """A GGUF from pre-encoded key-value and tensor-info records; the counts can lie."""
    head = magic + struct.pack("<IQQ", version, len(tensors) if tensor_count is None else tensor_count,
                               len(kvs) if kv_count is None else kv_count)
    body = head + b"".join(kvs) + b"".join(tensors)
    body += b"\0" * (-len(body) % alignment)
    return body + data


def kv_string(key: str, value: str) -> bytes:
    return gguf_string(key) + struct.pack("<I", 8) + gguf_string(value)


def kv_u32(key: str, value: int) -> bytes:
    return gguf_string(key) + struct.pack("<II", 4, value)


def tensor_info(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)
