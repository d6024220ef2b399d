"""Whose past outputs draft for whom: one drafter state per tenant.

The drafter learns from every request it serves (past outputs to draft from, calibration, token
recycling). Shared by all clients, that memory is a side channel: a client that sends a guessed question
can tell from the acceptance figures, or from how fast the answer came, whether someone was recently
given that answer. So by default each tenant (an API key, or a key plus the request's ``user``) gets
its own copy of the drafter's learned state, swapped in through the drafter's ``state_dict`` /
``load_state_dict`` before each of its requests, starting from the state the drafter had at startup
(datastores and warm start included, which hold no client's data)::

    request of tenant B ─► save A's state ─► load B's (or the startup state) ─► generate ─► ...
"""

from __future__ import annotations

import collections
import copy
import hashlib
from typing import Any, Protocol, runtime_checkable

from restspec.serve.config import HistoryMode

ANONYMOUS = "anonymous"
"""The tenant of requests with neither an API key nor a ``user``."""
SHARED = "*"
"""Where :meth:`DrafterMemory.states` puts the one state of a shared history."""
TENANT_ID_CHARS = 16
"""Hex characters kept of a tenant's SHA-256 (the key itself is never stored or logged)."""


def tenant_of(api_key: str | None, user: str | None) -> str:
    """The tenant a request belongs to: a digest of its API key and ``user`` (either may be None).

    >>> tenant_of(None, None)
    'anonymous'
    >>> tenant_of("k" * 16, "alice") != tenant_of("k" * 16, "bob") != tenant_of("k" * 16, None)
    True
    """
    if api_key is None and user is None:
        return ANONYMOUS
    digest = hashlib.sha256()
    for part in (api_key, user):
        digest.update(b"\x01" + part.encode() if part is not None else b"\x00")
        digest.update(b"\xff")
    return digest.hexdigest()[:TENANT_ID_CHARS]


@runtime_checkable
class StatefulDrafter(Protocol):
    """What per-tenant memory needs of a drafter: its learned state out and back in."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DrafterMemory:
    """Puts the right tenant's learned state into ``drafter`` before each request (worker thread only).
    The startup state is loaded as a deep copy each time, in case a drafter keeps what it is given.

    ``tenants`` bounds how many tenants' states are kept (least recently served forgotten first: such a
    tenant starts again from the startup state)."""

    def __init__(self, drafter: Any, mode: HistoryMode, tenants: int) -> None:
        if tenants < 1:
            raise ValueError(f"tenants={tenants} must be >= 1")
        if mode is not HistoryMode.shared and not isinstance(drafter, StatefulDrafter):
            raise TypeError(
                f"{type(drafter).__name__} has no state_dict/load_state_dict, which history mode "
                f"{mode.value!r} needs to keep tenants apart; give it those methods or serve with "
                "history 'shared' (--shared-history)"
            )
        self.drafter = drafter
        self.mode = mode
        self.tenants = tenants
        self._startup = drafter.state_dict() if mode is not HistoryMode.shared else None
        self._saved: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._loaded: str | None = None
        """The tenant whose state the drafter holds now (None: the startup state, untouched)."""

    @property
    def tenants_kept(self) -> int:
        """Tenants whose learned state is held (in the drafter or saved)."""
        return len(self._saved) + (self._loaded is not None)

    def enter(self, tenant: str) -> None:
        """Make the drafter hold ``tenant``'s state (call before the tenant's request starts)."""
        if self.mode is HistoryMode.shared:
            return
        if self.mode is HistoryMode.off:
            self.drafter.load_state_dict(copy.deepcopy(self._startup))
            return
        if tenant == self._loaded:
            return
        if self._loaded is not None:
            self._saved[self._loaded] = self.drafter.state_dict()  # a copy, by the learner protocol
            self._saved.move_to_end(self._loaded)
        state = self._saved.pop(tenant, None)
        while len(self._saved) >= self.tenants:  # room for the tenant now loaded
            self._saved.popitem(last=False)
        self.drafter.load_state_dict(state if state is not None else copy.deepcopy(self._startup))
        self._loaded = tenant

    def states(self) -> dict[str, dict[str, Any]]:
        """(worker thread) Every kept tenant's learned state, least recently served first (for saving)."""
        if self.mode is HistoryMode.off:
            return {}
        if self.mode is HistoryMode.shared:
            return {SHARED: self.drafter.state_dict()}
        states = dict(self._saved)
        if self._loaded is not None:
            states[self._loaded] = self.drafter.state_dict()
        return states

    def restore(self, states: dict[str, dict[str, Any]]) -> None:
        """(before serving) Continue from what :meth:`states` gave; each state is loaded once to check
        that it fits the drafter (``ValueError`` otherwise), then the drafter is back at its startup state."""
        if self.mode is HistoryMode.shared:
            if SHARED in states:
                self.drafter.load_state_dict(states[SHARED])
            return
        if self.mode is HistoryMode.off:
            return
        for state in states.values():
            self.drafter.load_state_dict(copy.deepcopy(state))
        self.drafter.load_state_dict(copy.deepcopy(self._startup))
        kept = list(states.items())[-self.tenants :]
        self._saved = collections.OrderedDict(kept)
        self._loaded = None
