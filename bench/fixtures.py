"""Tiny inputs and models for the benchmarks and the tests, importable by both (bench/ never imports tests/; the
tests import these from here).

- `tiny_model(family)`: a tiny random-weight model of each supported family, fp32, with GQA (no download).
  `VARIANTS` adds, per family, what makes it differ from llama at sizes this small: sliding windows shorter than
  the tests' inputs, soft-caps low enough that tanh bends the logits, multipliers away from 1, NoPE layers,
  partial rotary, a few experts.
- `write_tiny_model(folder)`, `byte_model_dir(folder)`: such models saved with a tokenizer, loadable with --model.
- `pdf_bytes(pages)`, `write_pdf(path, pages)`: minimal valid PDFs written by hand (objects, cross-reference table,
  trailer), so that nothing depends on a PDF-producing library.
- `corpus(folder)` with `SMALL`: a folder of three small texts and cache options that fit them; `worker_env()`:
  the environment for a cascadectl subprocess that reads this checkout.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

ROOT = Path(__file__).resolve().parents[1]

# --- models ---------------------------------------------------------------------------------------------------------

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


def write_tiny_model(folder: Path, words: list[str] | None = None, max_chars: int = 256, layers: int = 1,
                     hidden: int = 32, max_positions: int = 8192, seed: int = 0) -> Path:
    """Save a random-weight llama (safetensors) and a word-level tokenizer that `--model folder` loads.

    The tokenizer splits on whitespace and cuts longer runs into `max_chars` pieces; `words` are its vocabulary
    (anything else is `<unk>`), so generated text made of those words gives varied token ids.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(words or [])))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\S{1,%d}" % max_chars), behavior="removed", invert=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                         max_position_embeddings=max_positions, tie_word_embeddings=False)
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    hf_logging.disable_progress_bar()  # "Writing model shards" would land on the caller's stderr
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def byte_model_dir(folder: Path) -> Path:
    """A tiny random llama with a byte-level tokenizer (256 ids, no merges), loadable with --model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE({ch: i for i, ch in enumerate(alphabet)}, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(folder)
    tiny_model("llama", max_positions=1024).save_pretrained(folder, safe_serialization=True)
    return folder


# --- PDFs -----------------------------------------------------------------------------------------------------------


def _escape(text: str) -> str:
    """Escape a string for a PDF literal string `( ... )`; the standard 14 fonts only cover Latin-1."""
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _content_stream(text: str | None) -> bytes:
    """One line of `text` per `Tj`, 14 points apart, from the top left; None or "" draws a line and no text."""
    if not text:
        return b"0.5 w 72 700 m 300 700 l S\n"
    ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
    for i, line in enumerate(text.split("\n")):
        if i:
            ops.append("T*")
        ops.append(f"({_escape(line)}) Tj")
    ops.append("ET")
    return ("\n".join(ops) + "\n").encode("latin-1")


def pdf_bytes(pages: list[str | None]) -> bytes:
    """A minimal valid PDF 1.4 with one page per entry of `pages` (Helvetica text, or no text for None / "")."""
    n = len(pages)
    # Object numbers: 1 catalog, 2 page tree, 3 font, then (page, content) pairs.
    page_ids = [4 + 2 * i for i in range(n)]
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] /Count {n} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for i, text in enumerate(pages):
        content = _content_stream(text)
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {page_ids[i] + 1} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"endstream")

    return assemble(objects)


def assemble(objects: list[bytes]) -> bytes:
    """Objects 1..n (the catalog is object 1), a correct cross-reference table and the trailer."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref_at = len(out)
    out += b"xref\n0 %d\n" % (len(objects) + 1)
    out += b"0000000000 65535 f \n"  # each entry is exactly 20 bytes, hence the trailing space
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref_at)
    return bytes(out)


def write_pdf(path: Path, pages: list[str | None]) -> Path:
    """Write `pdf_bytes(pages)` to `path` and return it."""
    path.write_bytes(pdf_bytes(pages))
    return path


# --- a corpus and a subprocess --------------------------------------------------------------------------------------

SMALL = ["--cache-size", "64", "--stride", "16", "--sinks", "4", "--cascades", "4"]
TEXTS = {
    "a.txt": "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 3,
    "b.md": "# Notes\n\nThe cascade keeps the most attended tokens, twice as far back each level. " * 2,
    "sub/c.txt": "However little known the feelings or views of such a man may be on his first entering. " * 4,
}


def corpus(folder: Path, extra: dict[str, str] | None = None) -> Path:
    for name, text in {**TEXTS, **(extra or {})}.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def worker_env() -> dict[str, str]:
    """This process's environment for a cascadectl subprocess: one thread, this checkout first on the path, and no
    torchrun variables (the subprocess must not think it is a rank of ours)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env
