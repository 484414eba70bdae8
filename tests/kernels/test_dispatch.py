"""kernels/dispatch.py: CASCADECTL_KERNELS is read once per process, `use_reference` overrides it for a block, and
every entry point takes the path it names (on the CPU: the torch references and the CPU kernels)."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from cascade_kernels import dispatch
from cascade_kernels.chunk_attention import chunk_attention, chunk_attention_cpu, chunk_attention_ref, ema_weights
from cascade_kernels.rope import apply_rope, rotate_queries


def test_environment_parsing():
    assert dispatch.wants_reference({"CASCADECTL_KERNELS": "ref"})
    assert not dispatch.wants_reference({})
    assert not dispatch.wants_reference({"CASCADECTL_KERNELS": "triton"})


def test_environment_read_once_per_process():
    """A fresh process under CASCADECTL_KERNELS=ref forces the references; changing the variable later does not
    change the answer (it is read once); `use_reference(False)` lifts it for a block and restores it after."""
    code = ("import os; from cascade_kernels import dispatch as d; a = d.reference_only(); "
            "os.environ.pop('CASCADECTL_KERNELS'); b = d.reference_only()\n"
            "with d.use_reference(False): c = d.reference_only()\n"
            "print(a, b, c, d.reference_only())")
    env = {**os.environ, "CASCADECTL_KERNELS": "ref"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "False", "True"]


def test_use_reference_nests_and_restores():
    before = dispatch.reference_only()
    with dispatch.use_reference():
        assert dispatch.reference_only()
        with dispatch.use_reference(False):
            assert not dispatch.reference_only()
        assert dispatch.reference_only()
    assert dispatch.reference_only() == before


def test_cpu_paths():
    """On the CPU: chunk attention runs the CPU kernels, or under the override the reference, bit for bit; RoPE
    and the cache push are their torch forms either way."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 20, 32), torch.randn(1, 2, 50, 32), torch.randn(1, 2, 50, 32)
    ema = ema_weights(20, 0.99)
    with dispatch.use_reference(False):
        assert dispatch.attention_path(q, k) == "cpu"
        assert dispatch.rope_path(q, q[0, 0]) == "torch" and dispatch.push_path(k) == "ref"
        got = chunk_attention(q, k, v, 0.2, ema, 3, "max")
        want = chunk_attention_cpu(q, k, v, 0.2, ema, 3, "max")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with dispatch.use_reference():
        assert dispatch.attention_path(q, k) == "ref"
        got = chunk_attention(q, k, v, 0.2, ema, 3, "max")
        want = chunk_attention_ref(q, k, v, 0.2, ema, 3, "max")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        cos, sin = torch.randn(20, 32), torch.randn(20, 32)
        assert torch.equal(rotate_queries(q, cos, sin), apply_rope(q, cos, sin))


def test_no_module_reads_the_environment_itself():
    """The variable is read in kernels/dispatch.py only."""
    kernels = os.path.dirname(dispatch.__file__)
    readers = [name for name in sorted(os.listdir(kernels)) if name.endswith(".py") and name != "dispatch.py"
               and "os.environ" in open(os.path.join(kernels, name), encoding="utf-8").read()]
    assert readers == []
