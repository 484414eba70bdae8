"""The CLI end to end on CUDA (Triton kernels, GPU cache update): same numbers as the CPU path, no decode syncs.

The model is SmolLM2-135M-shaped with random weights (4 of its 30 layers) and the real tokenizer, so the test needs
no download: the tokenizer comes from the embedded model's converted cache or from $CASCADECTL_TOKENIZER_DIR (a
folder with tokenizer.json, tokenizer_config.json and config.json). Run on a GPU machine with
`python -m pytest -m gpu tests/cli/test_cuda_e2e.py`."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cascadectl.main import app

pytestmark = pytest.mark.gpu
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
SMALL = ["--cache-size", "512", "--cascades", "4", "--stride", "128", "--sinks", "16"]


def _tokenizer_dir() -> Path:
    env = os.environ.get("CASCADECTL_TOKENIZER_DIR")
    if env:
        return Path(env)
    from engine.models import ensure_converted, find_embedded_gguf

    try:
        return ensure_converted(find_embedded_gguf())[0]
    except Exception as e:  # no embedded model here: nothing to take the tokenizer from
        pytest.skip(f"no tokenizer: set CASCADECTL_TOKENIZER_DIR ({e})")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from transformers import LlamaConfig, LlamaForCausalLM

    src = _tokenizer_dir()
    config = LlamaConfig.from_pretrained(src)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    dest = tmp_path_factory.mktemp("smollm2-random")
    model.save_pretrained(dest, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    book = Path(__file__).resolve().parents[2] / "data" / "pride_and_prejudice.txt"
    path = tmp_path_factory.mktemp("text") / "book.txt"
    path.write_text(book.read_text(encoding="utf-8")[:40000], encoding="utf-8")  # ~10K tokens: 20x the cache
    return path


def _ppl(model_dir, text_file, device, dtype, policy="cascade"):
    result = CliRunner().invoke(app, ["ppl", str(text_file), "--model", str(model_dir), "--device", device,
                                      "--dtype", dtype, "--policy", policy, *SMALL, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _value(doc):
    return doc["results"][0]["ppl"]


@pytest.mark.parametrize("policy", ["cascade", "sink"])
def test_cuda_matches_cpu_in_fp32(model_dir, text_file, policy):
    """The same tokens, settings and weights give the same perplexity through the Triton path and the CPU path."""
    cpu = _value(_ppl(model_dir, text_file, "cpu", "fp32", policy))
    gpu = _value(_ppl(model_dir, text_file, "cuda", "fp32", policy))
    assert gpu == pytest.approx(cpu, rel=2e-3)


def test_cuda_bf16_close_to_fp32(model_dir, text_file):
    fp32 = _value(_ppl(model_dir, text_file, "cuda", "fp32"))
    bf16 = _value(_ppl(model_dir, text_file, "cuda", "bf16"))
    assert bf16 == pytest.approx(fp32, rel=3e-2)


def test_summarize_and_ask_on_cuda(model_dir, text_file):
    for args in (["summarize", str(text_file)], ["ask", str(text_file), "Who is Mr. Darcy?"]):
        result = CliRunner().invoke(app, [*args, "--model", str(model_dir), "--device", "cuda", *SMALL,
                                          "--max-tokens", "8", "--json"])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert doc["record"]["device"].startswith("cuda")
        assert doc["stats"]["tokens"] > 20 * 512 // 2
        assert doc["stats"]["generated_tokens"] >= 1
        graph = doc["stats"]["decode_graph"]  # 7 decode steps at a full cache: warm-up, capture, then replays
        assert graph["off"] is None and graph["captured"] == 1 and graph["replayed"] >= 1, graph


def test_decode_step_does_not_synchronise(model_dir):
    """A decode step (one token through the model and the cascade) issues no device-to-host synchronisation."""
    from engine.config import CacheConfig
    from engine.models import load_model
    from engine.runner import Runner

    lm = load_model(str(model_dir), "cuda", "bf16")
    config = CacheConfig(cache_size=512, cascades=4, stride=128, sinks=16)
    with Runner(lm.model, config) as runner:
        ids = torch.randint(0, 1000, (1, 2048), device="cuda")
        for i in range(0, 2048, 128):
            runner.step(ids[:, i : i + 128])
        token = ids[:, :1]
        runner.step(token)  # warm-up: first decode-shaped call compiles the decode kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                hidden = runner.step(token)
                token = runner.logits(hidden[:, -1:]).argmax(-1)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_evidence_on_cuda_matches_cpu(model_dir, text_file):
    """ask's evidence store on CUDA (one pinned question, and two probed ones) keeps the spans the CPU keeps, in fp32."""
    def spans(device, *args):
        result = CliRunner().invoke(app, ["ask", str(text_file), *args, "--model", str(model_dir), "--device",
                                          device, "--dtype", "fp32", *SMALL, "--max-tokens", "4", "--json"])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert doc["record"]["settings"]["evidence"] > 0
        return [[r["token_start"] for r in a["evidence"]] for a in doc["answers"]]

    for args in (["Who is Mr. Darcy?"], ["-q", "Who is Mr. Darcy?", "-q", "Where is Netherfield?"]):
        cpu, gpu = spans("cpu", *args), spans("cuda", *args)
        for c, g in zip(cpu, gpu):
            assert c and g and c[0] == g[0] and len(set(c) & set(g)) >= len(c) // 2, (args, c, g)


def test_several_questions_decode_together_on_cuda(model_dir, text_file):
    """`ask -q ... -q ...` on CUDA: one batch per step from the frozen cache, replayed as a CUDA graph."""
    def run(device, dtype):
        result = CliRunner().invoke(app, ["ask", str(text_file), "-q", "Who is Mr. Darcy?", "-q", "Where is it?",
                                          "-q", "When?", "--model", str(model_dir), "--device", device, "--dtype",
                                          dtype, *SMALL, "--max-tokens", "8", "--no-repeat-ngram", "0", "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    doc = run("cuda", "bf16")
    batch = doc["stats"]["answer_batch"]
    assert doc["record"]["generation"]["batch"] is True and batch["questions"] == 3
    assert batch["decode_graph"]["captured"] == 1 and batch["decode_graph"]["replayed"] >= 1, batch
    assert doc["stats"]["generated_tokens"] > 8
