"""Parse the benchmark grids given on the command line: token counts ("2k", "512", "0.5x"), depths, policies.

Every error is a ConfigError naming the flag, so a bad grid fails before the model is loaded. Besides the cache
policies, the question-answering benchmarks (passkey, ruler) compare `cascade+evidence`: the cascade with an
evidence store (engine/evidence.py) inside the same --cache-size, so that every policy runs at equal memory."""
from __future__ import annotations

import math

from ..config import POLICIES, CacheConfig
from ..errors import ConfigError

EVIDENCE_POLICY = "cascade+evidence"
BENCH_POLICIES = (*POLICIES, EVIDENCE_POLICY)  # --policy of bench passkey and bench ruler
SUFFIXES = {"k": 1 << 10, "m": 1 << 20}  # 2k = 2048 tokens, as in the passkey literature


def _items(text: str, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{flag} is empty; give a comma-separated list")
    return items


def parse_count(item: str, flag: str, unit: int | None = None) -> int:
    """'512' -> 512, '2k' -> 2048, '1.5k' -> 1536, and with `unit` (the cache size) '0.5x' -> unit // 2."""
    text = item.strip().lower()
    scale = 1.0
    if text.endswith("x"):
        if unit is None:
            raise ConfigError(f"{flag}: {item!r} is relative to the cache size, which this option does not have")
        text, scale = text[:-1], float(unit)
    elif text[-1:] in SUFFIXES:
        text, scale = text[:-1], float(SUFFIXES[text[-1]])
    try:
        value = float(text) * scale
    except ValueError:
        raise ConfigError(f"{flag}: {item!r} is not a token count (e.g. 512, 2k or, relative to --cache-size, "
                          f"0.5x)") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{flag}: {item!r} must be a count >= 0")
    return round(value)


def parse_counts(text: str, flag: str, unit: int | None = None, minimum: int = 0) -> list[int]:
    """A comma-separated list of counts, duplicates dropped, in increasing order."""
    values = sorted({parse_count(item, flag, unit) for item in _items(text, flag)})
    if values[0] < minimum:
        raise ConfigError(f"{flag}: every value must be >= {minimum} (got {values[0]})")
    return values


def parse_depths(text: str, flag: str = "--depths") -> list[float]:
    """Fractions strictly between 0 and 1 (where in the filler the key sits), in increasing order."""
    values = []
    for item in _items(text, flag):
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"{flag}: {item!r} is not a number between 0 and 1") from None
        if not 0.0 < value < 1.0:
            raise ConfigError(f"{flag}: every depth must be strictly between 0 and 1 (got {item})")
        values.append(value)
    return sorted(set(values))


def parse_choices(text: str, flag: str, allowed: tuple[str, ...] = POLICIES) -> list[str]:
    """A comma-separated subset of `allowed`, in the order given, duplicates dropped."""
    names = list(dict.fromkeys(item.lower() for item in _items(text, flag)))
    for name in names:
        if name not in allowed:
            raise ConfigError(f"{flag}: {name!r} is not one of {', '.join(allowed)}")
    return names


def policy_config(name: str, settings: dict, evidence_slots: int = 0) -> CacheConfig:
    """The CacheConfig of a --policy name: `cascade+evidence` is `cascade` with `evidence_slots` of its cache
    given to the evidence store (CacheConfig.with_evidence: the stride is clipped to one sub-cache)."""
    if name != EVIDENCE_POLICY:
        return CacheConfig(policy=name, **settings)
    if evidence_slots < 1:
        raise ConfigError(f"--policy {EVIDENCE_POLICY} needs --evidence >= 1 (got {evidence_slots}); use --policy "
                          f"cascade for none")
    return CacheConfig(policy="cascade", **settings).with_evidence(evidence_slots)


def policy_name(config: CacheConfig) -> str:
    """The --policy name of a config: `cascade+evidence` when it has evidence slots."""
    return EVIDENCE_POLICY if config.evidence else config.policy
