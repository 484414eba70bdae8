"""Run the Triton kernels in Triton's CPU interpreter: a private copy of the `cascade_kernels` package imported with
TRITON_INTERPRET=1 (Triton reads it when a kernel is decorated). Used by the kernel tests on CPU-only machines;
they skip where triton is not installed (it is in the test extra, so CI runs them) and on CUDA machines, which
run the compiled kernels (-m gpu); a kernel the installed triton cannot interpret fails."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import kernels
import cascade_kernels._triton as kt

PACKAGE = "_kernels_interpreted"


def _load(module: str) -> ModuleType:
    """`cascade_kernels.<module>` from the interpreted copy of the package (a namespace package: no __init__)."""
    if PACKAGE not in sys.modules:
        package = ModuleType(PACKAGE)
        package.__path__ = [str(Path(kt.__file__).parent)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{module}")


def _interpret_triton_language(monkeypatch) -> None:
    """Triton's own jit'd helpers (tl.max, tl.sum, tl.zeros, ...) were decorated when triton was first imported,
    without TRITON_INTERPRET; the interpreter can only call interpreted ones, so swap them in for this test."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    tl = kt.tl
    for module in {tl, tl.standard, tl.core, getattr(tl, "math", tl)}:
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                monkeypatch.setattr(module, attr, InterpretedFunction(value.fn))


def interpreted(monkeypatch, module: str, probe) -> ModuleType:
    """The interpreted `cascade_kernels.<module>` for this test, after `probe(module)` ran once; skips where it cannot."""
    if kt.triton is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("interpreter tests run on CPU-only machines; CUDA runs the compiled kernels (-m gpu)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton checks it while the interpreter runs, too
    _interpret_triton_language(monkeypatch)
    loaded = _load(module)
    try:  # e.g. triton < 3.6's interpreter cannot take loop bounds from program ids under numpy >= 2.4
        probe(loaded)
    except Exception as exc:  # noqa: BLE001 - a kernel this triton cannot interpret is a failure, not a skip
        pytest.fail(f"Triton {kt.triton.__version__}'s interpreter cannot run {module} "
                    f"({type(exc).__name__}: {str(exc)[:200]}); the test extra asks for triton >= 3.6")
    return loaded
