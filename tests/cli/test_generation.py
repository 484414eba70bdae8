"""`--version`, and the sampling options of `summarize` and `ask` over the model's generation_config."""
import json

import pytest

from tests.cli.fakes import fake_lm, invoke

SMALL = ["--cache-size", "128", "--stride", "32", "--sinks", "4", "--max-tokens", "12", "--json"]
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 8



@pytest.fixture
def model(monkeypatch):
    """The fake model of every command; the test may set its generation_config."""
    from cascadectl.commands import ask, summarize

    lm = fake_lm()
    for module in (summarize, ask):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: lm)
    return lm


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    return str(path)


def test_version():
    from cascadectl import __version__

    result = invoke(["--version"])
    assert result.exit_code == 0 and result.stdout == f"cascadectl {__version__}\n"


def test_default_is_greedy_when_the_model_asks_for_nothing(model, text_file):
    default = json.loads(invoke(["summarize", text_file, *SMALL]).stdout)
    greedy = json.loads(invoke(["summarize", text_file, *SMALL, "--temperature", "0", "--no-repeat-ngram", "4"]).stdout)
    assert default["answer"] == greedy["answer"]
    g = default["record"]["generation"]
    assert g["do_sample"] is False and g["temperature"] == 0.0 and g["model_defaults"] == []
    assert g["no_repeat_ngram"] == 4  # the fallback: the model sets no repetition control
    plain = json.loads(invoke(["summarize", text_file, *SMALL, "--no-repeat-ngram", "0"]).stdout)
    exact = json.loads(invoke(["summarize", text_file, *SMALL, "--temperature", "0"]).stdout)
    assert plain["answer"] == exact["answer"] and exact["record"]["generation"]["no_repeat_ngram"] is None
    assert {"top_k", "top_p", "min_p", "repeat_penalty", "seed", "stop_ids", "max_tokens"} <= set(g)
    assert 0 in g["stop_ids"]  # the tokenizer's eos


def test_the_models_sampling_defaults_apply_unless_overridden(model, text_file):
    greedy = json.loads(invoke(["ask", text_file, "Who?", *SMALL]).stdout)
    plain = json.loads(invoke(["ask", text_file, "Who?", *SMALL, "--temperature", "0"]).stdout)
    model.model.generation_config.update(do_sample=True, temperature=1.5, top_k=100)
    runs = [json.loads(invoke(["ask", text_file, "Who?", *SMALL, *extra]).stdout) for extra in
            ([], [], ["--seed", "1"], ["--temperature", "0"], ["--top-k", "1"])]
    g = runs[0]["record"]["generation"]
    assert g["do_sample"] is True and g["temperature"] == 1.5 and g["top_k"] == 100
    assert g["model_defaults"] == ["do_sample", "temperature", "top_k"]
    assert runs[0]["answer"] == runs[1]["answer"] != greedy["answer"]  # seeded
    assert runs[2]["answer"] != runs[0]["answer"]
    assert runs[3]["answer"] == plain["answer"] and runs[3]["record"]["generation"]["model_defaults"] == []
    assert runs[4]["answer"] == greedy["answer"] and runs[4]["record"]["generation"]["top_k"] == 1


@pytest.mark.parametrize("args, flag", [
    (["--top-p", "-0.5"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--top-k", "-1"], "--top-k"),
    (["--min-p", "2"], "--min-p"), (["--repeat-penalty", "0"], "--repeat-penalty"),
    (["--temperature", "-1"], "--temperature"), (["--no-repeat-ngram", "-2"], "--no-repeat-ngram"),
])
@pytest.mark.parametrize("command", [["summarize", "{file}"], ["ask", "{file}", "Who?"]])
def test_bad_sampling_options_are_one_line_and_exit_2(model, text_file, command, args, flag):
    result = invoke([a.replace("{file}", text_file) for a in command] + args)
    assert result.exit_code == 2, result.output
    assert flag in result.stderr and "Traceback" not in result.output
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
