"""Session fixtures: the embedded model is loaded (and converted on first use) once per test run."""
import pytest


@pytest.fixture(scope="session")
def embedded_fp32():
    from engine.models import load_model

    return load_model(None, "cpu", "fp32")
