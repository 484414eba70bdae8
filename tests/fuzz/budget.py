"""Run a Hypothesis property for a wall-clock budget instead of a fixed number of examples, with a hang guard.

Hypothesis stops after `max_examples`; a fuzz campaign wants "as many as fit in N seconds". `fuzz_for` builds a
fresh `@given` test per round (new random seed, no example database) and repeats rounds until the budget is spent,
counting examples. `per_example_timeout` turns a hang (a parser looping on a crafted file) into a failure.

Budgets: the quick versions in the default suite run `QUICK_EXAMPLES` examples; the `fuzz`-marked versions run
for `CASCADECTL_FUZZ_SECONDS` (default 30) each. `CASCADECTL_FUZZ_LOG=FILE` appends one JSON line per campaign
(target, seconds, examples, examples/s) so that docs/ROBUSTNESS.md can quote real runs.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ_SECONDS = float(os.environ.get("CASCADECTL_FUZZ_SECONDS", "30"))
QUICK_EXAMPLES = 30
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
          HealthCheck.function_scoped_fixture, HealthCheck.large_base_example]


class Hang(Exception):
    """One example ran past its time limit."""


@contextlib.contextmanager
def per_example_timeout(seconds: float) -> Iterator[None]:
    """Raise `Hang` inside the code under test if it runs longer than `seconds` (main thread only, via SIGALRM)."""
    def on_alarm(signum, frame):
        raise Hang(f"one example ran longer than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Campaign:
    target: str
    seconds: float
    examples: int

    def log(self) -> None:
        path = os.environ.get("CASCADECTL_FUZZ_LOG")
        line = {"target": self.target, "seconds": round(self.seconds, 1), "examples": self.examples,
                "examples_per_s": round(self.examples / self.seconds, 1) if self.seconds else 0.0}
        print(f"\nfuzz {json.dumps(line)}")
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")


def fuzz_for(target: str, strategy: st.SearchStrategy, check: Callable, seconds: float | None = None,
             examples: int | None = None, round_size: int = 50) -> Campaign:
    """Call `check(value)` on values drawn from `strategy` for `seconds` (or exactly `examples` examples).

    A failing example is shrunk and re-raised by Hypothesis as usual; the campaign is logged either way."""
    count = [0]

    def counted(value) -> None:
        count[0] += 1
        check(value)

    start = time.monotonic()
    try:
        while True:
            n = round_size if examples is None else examples
            run = settings(max_examples=n, deadline=None, database=None, suppress_health_check=HEALTH,
                           print_blob=True)(given(strategy)(counted))
            run()
            if examples is not None or time.monotonic() - start >= (seconds or FUZZ_SECONDS):
                break
    finally:
        campaign = Campaign(target, time.monotonic() - start, count[0])
        campaign.log()
    return campaign
