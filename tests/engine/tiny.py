"""The tiny random-weight models of the tests: they live in bench/fixtures.py, which the benchmarks import too
(bench/ never imports tests/)."""
from bench.fixtures import VARIANTS, WINDOW, tiny_model  # noqa: F401
