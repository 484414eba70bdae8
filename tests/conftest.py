"""Session fixtures: the embedded model is loaded (and converted on first use) once per test run."""
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
