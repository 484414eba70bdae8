"""Shared fixtures: the embedded model, loaded (and converted on first use) once per test run; `tiny`, the tiny fake
model in place of every command's; one torch thread."""
import pytest
import torch


@pytest.fixture(scope="session")
def embedded_fp32():
    from engine.models import load_model

    return load_model(None, "cpu", "fp32")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the GGUF conversions are many small ops; see tests/engine/test_gguf.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(monkeypatch) -> dict[str, int]:
    """Every command that loads a model (ppl, summarize, ask, bench passkey/retention/ruler) gets the tiny fake
    model of tests/cli/fakes.py instead, for this test. Returns {"n": 8192}, the fake model's max positions, which a
    test may lower before it runs a command. A module that wants it for every test says
    `pytestmark = pytest.mark.usefixtures("tiny")`."""
    from cascadectl.commands import ask, bench_passkey, bench_retention, bench_ruler, ppl, summarize
    from tests.cli.fakes import fake_lm

    positions = {"n": 8192}
    for module in (ppl, summarize, ask, bench_passkey, bench_retention, bench_ruler):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: fake_lm(positions["n"]))
    return positions
