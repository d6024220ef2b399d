"""Whose past outputs draft for whom: one drafter per tenant.

The drafter learns from every request it serves (past outputs to draft from, calibration, token
recycling). Shared by all clients, that memory is a side channel: a client that sends a guessed question
can tell from the acceptance figures, or from how fast the answer came, whether someone was recently
given that answer. So by default each tenant (an API key, or a key plus the request's ``user``) drafts
with a drafter of its own, which starts from the state the drafter had at startup (datastores and warm
start included, which hold no client's data).

Requests of several tenants share one batch, so each running tenant needs its own drafter object: a
pool of at most ``slots`` drafters (one per request that may run at once), each holding one tenant's
learned state. A tenant's concurrent requests share its drafter (drafters keep per-request state by
request id). A tenant without a drafter takes an idle one, whose previous tenant's state is saved back
as a copy (``state_dict``), and loads its own (``load_state_dict``)::

    request of tenant C, drafters [A: idle, B: running] ─► save A's state ─► load C's (or the startup
    state) into A's drafter ─► generate with it (B's requests in the same batch keep their drafter)
"""

from __future__ import annotations

import collections
import copy
import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from restspec.serve.config import HistoryMode

ANONYMOUS = "anonymous"
"""The tenant of requests with neither an API key nor a ``user``."""
SHARED = "*"
"""The one tenant of a shared history (where :meth:`TenantDrafters.states` puts its state)."""
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


@dataclass(eq=False)
class _Slot:
    """One drafter of the pool."""

    drafter: Any
    tenant: str | None = None
    """Whose learned state it holds (None: no kept tenant's)."""
    fresh: bool = False
    """It holds the startup state, untouched."""
    users: int = 0
    """Running requests that draft with it."""


class TenantDrafters:
    """The drafter each request drafts with, by its tenant (any thread; see the module's docstring).

    ``drafter`` is the first of the pool (the generator's own, in its startup state); ``new_drafter``
    builds the others, up to ``slots`` in all (as many as requests may run at once). ``tenants`` bounds
    how many tenants' states are kept, in a drafter or saved (the least recently served are forgotten
    first: such a tenant starts again from the startup state). With history ``shared`` every request
    drafts with ``drafter``; with ``off`` each gets an idle drafter reset to the startup state. The
    startup state and saved states are loaded as deep copies, in case a drafter keeps what it is given."""

    def __init__(
        self,
        drafter: Any,
        mode: HistoryMode,
        tenants: int,
        *,
        slots: int = 1,
        new_drafter: Callable[[], Any] | None = None,
    ) -> None:
        if tenants < 1:
            raise ValueError(f"tenants={tenants} must be >= 1")
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1")
        if mode is not HistoryMode.shared and not isinstance(drafter, StatefulDrafter):
            raise TypeError(
                f"{type(drafter).__name__} has no state_dict/load_state_dict, which history mode "
                f"{mode.value!r} needs to keep tenants apart; give it those methods or serve with "
                "history 'shared' (--shared-history)"
            )
        if mode is not HistoryMode.shared and slots > 1 and new_drafter is None:
            raise ValueError(
                f"history {mode.value!r} with {slots} requests at once needs new_drafter, which builds a "
                "drafter for each tenant running at the same time (app_for_engine passes the engine's "
                "new_drafter); pass it, or serve with history 'shared' or max_batch=1"
            )
        self.mode = mode
        self.tenants = tenants
        self.slots = 1 if mode is HistoryMode.shared else slots
        self._new_drafter = new_drafter
        self._startup = drafter.state_dict() if mode is not HistoryMode.shared else None
        self._pool = [_Slot(drafter, fresh=True)]
        self._kept: collections.OrderedDict[str, dict[str, Any] | None] = collections.OrderedDict()
        """Kept tenants, least recently served first, with the state last saved of each (None: none
        yet). A tenant that holds a drafter may have learned more since."""
        self._lock = threading.Lock()

    @property
    def drafters(self) -> int:
        """Drafter objects built so far (at most ``slots``)."""
        return len(self._pool)

    @property
    def tenants_kept(self) -> int:
        """Tenants whose learned state is held (in a drafter or saved)."""
        return len(self._kept)

    @contextmanager
    def drafting(self, tenant: str) -> Iterator[Any]:
        """The drafter for a request of ``tenant``, kept for it until the block ends (end the
        generation inside the block: the drafter may then be handed to another tenant)."""
        with self._lock:
            if self.mode is HistoryMode.off:
                slot = self._free_slot()
                self._reset(slot, None)
            else:
                slot = self._slot_of(SHARED if self.mode is HistoryMode.shared else tenant)
            slot.users += 1
            self._forget_beyond_limit()
        try:
            yield slot.drafter
        finally:
            with self._lock:
                slot.users -= 1

    def _slot_of(self, tenant: str) -> _Slot:
        """(locked) ``tenant``'s drafter (its state loaded into a free one if it has none), now the most
        recently served."""
        slot = next((s for s in self._pool if s.tenant == tenant), None)
        if slot is None:
            slot = self._free_slot()
            self._reset(slot, self._kept.get(tenant))
            slot.tenant = tenant
        self._kept[tenant] = self._kept.get(tenant)
        self._kept.move_to_end(tenant)
        return slot

    def _reset(self, slot: _Slot, state: dict[str, Any] | None) -> None:
        """(locked) Load ``state`` (None: the startup state) into an idle drafter."""
        if state is not None:
            slot.drafter.load_state_dict(copy.deepcopy(state))
        elif not slot.fresh:
            slot.drafter.load_state_dict(copy.deepcopy(self._startup))
        slot.fresh = False

    def _free_slot(self) -> _Slot:
        """(locked) An idle drafter holding no kept tenant's state: a new one while the pool has room,
        else the least recently served tenant's, whose state is saved back first."""
        for slot in self._pool:
            if slot.users == 0 and slot.tenant is None:
                return slot
        if len(self._pool) < self.slots:
            assert self._new_drafter is not None  # checked at construction
            self._pool.append(_Slot(self._new_drafter()))
            return self._pool[-1]
        for tenant in self._kept:
            for slot in self._pool:
                if slot.tenant == tenant and slot.users == 0:
                    self._kept[tenant] = slot.drafter.state_dict()  # a copy, by the learner protocol
                    slot.tenant = None
                    return slot
        raise RuntimeError(f"all {len(self._pool)} drafters are in use (at most {self.slots} requests run)")

    def _forget_beyond_limit(self) -> None:
        """(locked) Forget the least recently served tenants beyond ``tenants`` (not those running)."""
        excess = len(self._kept) - self.tenants
        for tenant in list(self._kept):
            if excess <= 0:
                return
            slot = next((s for s in self._pool if s.tenant == tenant), None)
            if slot is not None:
                if slot.users:
                    continue
                slot.tenant = None  # its drafter is loaded over when it is next taken
            del self._kept[tenant]
            excess -= 1

    def states(self) -> dict[str, dict[str, Any]]:
        """Every kept tenant's learned state, least recently served first (for saving): a tenant with
        requests running at the moment appears with the state it was last saved with."""
        if self.mode is HistoryMode.off:
            return {}
        with self._lock:
            for slot in self._pool:
                if slot.tenant is not None and slot.users == 0:
                    self._kept[slot.tenant] = slot.drafter.state_dict()
            return {tenant: state for tenant, state in self._kept.items() if state is not None}

    def restore(self, states: dict[str, dict[str, Any]]) -> None:
        """(before serving) Continue from what :meth:`states` gave. Each state is loaded once to check
        that it fits the drafter (``ValueError`` otherwise)."""
        if self.mode is HistoryMode.off:
            return
        if self.mode is HistoryMode.shared:
            states = {SHARED: states[SHARED]} if SHARED in states else {}
        with self._lock:
            first = self._pool[0]
            for state in states.values():
                first.drafter.load_state_dict(copy.deepcopy(state))
            if self.mode is HistoryMode.shared and states:
                first.tenant, first.fresh = SHARED, False  # it holds the shared state now
            elif states:
                first.drafter.load_state_dict(copy.deepcopy(self._startup))
            self._kept = collections.OrderedDict(list(states.items())[-self.tenants :])
