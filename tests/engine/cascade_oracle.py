"""Per-token statement of the cascading rule (docs/ALGORITHM.md §2), one head, pure Python.

Written to be obviously right, not fast: the chunked, vectorised CascadeCache is checked against it."""
from __future__ import annotations


class PerTokenCascade:
    def __init__(self, n_sinks: int, width: int, cascades: int):
        self.n_sinks, self.width, self.cascades = n_sinks, width, cascades
        self.sinks: list[int] = []
        self.rings: list[list[tuple[int, float]]] = [[] for _ in range(cascades)]  # oldest first
        self.t = 0

    def push(self, token: int, score: float) -> None:
        t, self.t = self.t, self.t + 1
        if len(self.sinks) < self.n_sinks:
            self.sinks.append(token)
            return
        eager = t <= self.width * self.cascades + self.n_sinks
        carry = (token, score)
        for i, ring in enumerate(self.rings):
            if eager or (t - self.n_sinks) % 2**i == 0:
                ring.append(carry)
                if len(ring) <= self.width:
                    return
                carry = ring.pop(0)  # the oldest moves on
                if self._dropped(carry):
                    return
                continue
            if not ring:
                ring.append(carry)
            elif self._loses(ring[-1]) or carry[1] >= ring[-1][1]:  # compete with the newest; ties: the newcomer
                ring[-1] = carry
            return

    def _dropped(self, item: tuple[int, float]) -> bool:
        """Is an item that a ring pushes out dropped instead of passed on? (never here)"""
        return False

    def _loses(self, item: tuple[int, float]) -> bool:
        """Does a ring's newest item lose any compete? (never here)"""
        return False

    def visible(self) -> list[int]:
        """Sinks, then the rings from the oldest (last) to the newest (first), each oldest first."""
        return self.sinks + [tok for ring in reversed(self.rings) for tok, _ in ring]


class PerTokenEvidenceCascade(PerTokenCascade):
    """The cascade beside an evidence store (engine/cache/evidence.py), one head, per token.

    `take(t)` between chunks moves token t out of the cascade into the store when it sits where every head has it:
    anywhere while nothing was evicted (one FIFO), else in sub-cache 0. A taken token is *dead* in the cascade:
    invisible, it loses any compete, and a ring that pushes it out drops it."""

    def __init__(self, n_sinks: int, width: int, cascades: int):
        super().__init__(n_sinks, width, cascades)
        self.store: list[int] = []
        self.dead: set[int] = set()
        self.evicted = False

    def take(self, token: int) -> bool:
        rings = self.rings if not self.evicted else self.rings[:1]
        if token in self.dead or not any(tok == token for ring in rings for tok, _ in ring):
            return False
        self.dead.add(token)
        self.store.append(token)
        return True

    def push(self, token: int, score: float) -> None:
        self.evicted |= len(self.sinks) == self.n_sinks and self.t > self.width * self.cascades + self.n_sinks
        super().push(token, score)

    def _dropped(self, item: tuple[int, float]) -> bool:
        return item[0] in self.dead  # its copy lives in the store: dropped, not passed on

    def _loses(self, item: tuple[int, float]) -> bool:
        return item[0] in self.dead

    def visible(self) -> list[int]:
        return self.sinks + sorted(self.store) + [tok for ring in reversed(self.rings) for tok, _ in ring
                                                  if tok not in self.dead]
