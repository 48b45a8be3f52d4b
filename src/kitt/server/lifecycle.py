"""Test state machine (ARCHITECTURE.md §5). Illegal transitions are refused, not applied.

    queued → dispatched → running → completed | failed | cancelled
       ↘ cancelled   ↘ (completed | failed | cancelled | lost)   ↘ lost

Re-reporting the current state is accepted and changes nothing, because agents deliver
at least once.
"""

from __future__ import annotations

ALLOWED: dict[str, frozenset[str]] = {
    # The agent's own "running" (or final) report can overtake the dispatcher recording
    # that its push was accepted: the report proves the dispatch happened.
    "queued": frozenset({"dispatched", "running", "completed", "failed", "cancelled"}),
    # A fast job can finish before its "running" report lands; a dispatched test whose
    # agent never took it can be cancelled or lost.
    "dispatched": frozenset({"running", "completed", "failed", "cancelled", "lost"}),
    "running": frozenset({"completed", "failed", "cancelled", "lost"}),
    # An agent that comes back after being declared lost still reports how its test ended.
    "lost": frozenset({"completed", "failed", "cancelled"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


class IllegalTransitionError(Exception):
    def __init__(self, test_id: str, current: str, wanted: str) -> None:
        super().__init__(f"test {test_id} is {current}; it cannot become {wanted}")
        self.current = current
        self.wanted = wanted


def check(test_id: str, current: str, wanted: str) -> bool:
    """True when the state changes, False for a repeat; raises when illegal."""
    if current == wanted:
        return False
    if wanted not in ALLOWED.get(current, frozenset()):
        raise IllegalTransitionError(test_id, current, wanted)
    return True
