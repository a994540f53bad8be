"""What the two ends of a protection do with the witness.

The primary (``LeaseKeeper``, protect --witness) holds the lease of its generation and
releases an epoch's output only while the lease is valid by its own monotonic clock,
counted from when it *sent* the request that got it, less a safety margin (the two hosts'
clocks are never compared; the witness adds its own grace before anyone else may take
over). A thread renews it every quarter of its duration. When protection ends with the
guest running on here (backup lost, protect stopped) the primary first *claims* the next
generation (``claim``): the one the backup would fail over as, so the backup's copy can
no longer win it.

The backup (``WitnessGate``, migrate-receive -r --witness) may resume its copy only once
the witness gave it that next generation, which it does once the primary's lease ran out.
It is a failover gate, as the fence is (receive/fence.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xen_remus.errors import GuestHeld
from xen_remus.witness import proto as P
from xen_remus.witness.client import WitnessClient, WitnessUnreachable

log = logging.getLogger("xen_remus.witness")

LEASE_S = 10.0  # asked for; the witness may grant less
MARGIN_S = 3.0  # the lease counts as gone this long before its end, by our clock
RETRY_S = 1.0  # after an unanswered request
GATE_TIMEOUT_S = 120.0  # the backup's wait for the witness to decide
LOG_EVERY_S = 10.0


class LeaseLost(GuestHeld):
    """The witness gave the guest to another host (a newer generation): this copy must
    not run; names the record."""


class LeaseKeeper:
    """The primary's lease on ``guest`` for ``generation``."""

    def __init__(self, client: WitnessClient, guest: str, generation: int, holder: str,
                 duration_s: float = LEASE_S, margin_s: float = MARGIN_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.guest, self.holder = client, guest, holder
        self.generation = generation
        self.duration_s, self.margin_s, self.clock = duration_s, margin_s, clock
        self.expires = -math.inf  # by our clock
        self.granted_s = duration_s
        self.lost: str | None = None  # why the lease is gone for good
        self.last_error: str | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- asking ---------------------------------------------------------------------------
    def ask(self, op: int, generation: int | None = None) -> P.Response | None:
        """One request; the lease updated from its answer. None: no answer."""
        gen = self.generation if generation is None else generation
        req = P.Request(op, self.guest, gen, self.holder, round(self.duration_s * 1000))
        sent = self.clock()
        try:
            resp = self.client.call(req)
        except WitnessUnreachable as exc:
            self.last_error = str(exc)
            log.debug("%s", exc)
            return None
        with self._cond:
            if resp.status == P.GRANTED:
                self.last_error = None
                if op != P.RELEASE:
                    self.generation = gen
                    self.granted_s = resp.duration_ms / 1000
                    self.expires = sent + self.granted_s
            elif resp.status == P.STALE and gen == self.generation:
                self.lost = f"the witness {self.client.what}: {resp}"
            else:
                self.last_error = f"the witness {self.client.what}: {req}: {resp}"
            self._cond.notify_all()
        return resp

    def acquire(self, timeout: float) -> None:
        """Take the lease (protect's start); LeaseLost or WitnessUnreachable if it could
        not within ``timeout`` s."""
        deadline = self.clock() + timeout
        while True:
            resp = self.ask(P.ACQUIRE)
            if resp is not None and resp.status == P.GRANTED:
                log.info("the witness %s granted %s generation %d for %.1f s",
                         self.client.what, self.guest, self.generation, self.granted_s)
                return
            if self.lost is not None:
                raise LeaseLost(self.lost)
            if self.clock() + RETRY_S > deadline:
                raise WitnessUnreachable(f"no lease on {self.guest} generation "
                                         f"{self.generation} within {timeout:g} s: "
                                         f"{self.last_error}")
            time.sleep(RETRY_S)

    # -- holding --------------------------------------------------------------------------
    def valid(self) -> bool:
        """Whether output may be released now."""
        return self.lost is None and self.clock() < self.expires - self.margin_s

    def wait_valid(self, timeout: float) -> bool:
        deadline = self.clock() + timeout
        with self._cond:
            while not self.valid() and self.lost is None:
                left = deadline - self.clock()
                if left <= 0:
                    return False
                self._cond.wait(min(left, RETRY_S))
        return self.valid()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="witness-lease",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.client.timeout + 1)
            self._thread = None

    def _renew(self) -> None:
        while not self._stop.is_set() and self.lost is None:
            resp = self.ask(P.RENEW)
            if resp is not None and resp.status == P.DENIED:
                resp = self.ask(P.ACQUIRE)  # the witness lost its record: take it again
            ok = resp is not None and resp.status == P.GRANTED
            if not ok and self.lost is None:
                log.warning("cannot renew the lease on %s (%s); %s", self.guest,
                            self.last_error, "output still goes out for "
                            f"{self.expires - self.margin_s - self.clock():.1f} s"
                            if self.valid() else "its output is held")
            self._stop.wait(self.granted_s / 4 if ok else RETRY_S)
        if self.lost is not None:
            log.error("lease on %s lost: %s", self.guest, self.lost)

    # -- the end of protection -----------------------------------------------------------
    def claim(self, timeout: float, on_expiry: Callable[[], None]) -> str | None:
        """Take generation + 1 (the one a failover of the backup would be), the renewer
        stopped: None once this host has it, else why not. ``on_expiry`` is called once if
        the current lease runs out meanwhile (pause the guest)."""
        self.stop()
        want = self.generation + 1
        deadline = self.clock() + timeout
        expired = False
        while True:
            if not expired and not self.valid():
                expired = True
                on_expiry()
            resp = self.ask(P.ACQUIRE, want)
            if resp is not None and resp.status == P.GRANTED:
                log.warning("the witness %s gave generation %d of %s to this host: the "
                            "backup's copy will not resume", self.client.what, want,
                            self.guest)
                return None
            if resp is not None and resp.status == P.STALE:
                return f"the witness {self.client.what} refused generation {want}: {resp}"
            if self.clock() + RETRY_S > deadline:
                return (f"the witness {self.client.what} did not give generation {want} "
                        f"within {timeout:g} s: {self.last_error}")
            time.sleep(RETRY_S)

    def release(self) -> None:
        """Give the lease back (best effort)."""
        self.stop()
        self.ask(P.RELEASE)


@dataclass
class OutputGate:
    """The primary's side: RemusLoop's check before it commits an epoch's output (the
    lease must be valid; if it is not, the guest is paused until it is again, LeaseLost
    if never), and the claim when protection ends with the guest running on here."""

    keeper: LeaseKeeper
    pause: Callable[[], None]
    unpause: Callable[[], None]
    on_state: Callable[[str, str], None] = field(default=lambda state, why: None)
    paused: bool = False

    def hold(self) -> None:
        if not self.paused:
            self.pause()
            self.paused = True

    def let_go(self) -> None:
        if self.paused:
            self.unpause()
            self.paused = False

    def __call__(self, epoch: int) -> None:
        k = self.keeper
        if k.valid():
            return
        self.hold()
        why = k.lost or k.last_error or "the lease ran out"
        log.warning("epoch %d: no valid lease from the witness (%s): the guest is paused "
                    "and its output held until the witness renews it", epoch, why)
        self.on_state("paused", f"epoch {epoch}: no lease from the witness: {why}")
        t0 = k.clock()
        while not k.wait_valid(LOG_EVERY_S):
            if k.lost is not None:
                raise LeaseLost(f"epoch {epoch}: {k.lost}")
            log.warning("epoch %d: still no lease after %.0f s (%s); the guest stays "
                        "paused", epoch, k.clock() - t0, k.last_error)
        self.let_go()
        log.warning("epoch %d: the witness renewed the lease after %.1f s: the guest runs "
                    "again", epoch, k.clock() - t0)
        self.on_state("protecting", f"lease renewed at epoch {epoch}")

    def claim(self, timeout: float) -> str | None:
        """LeaseKeeper.claim, the guest paused if the lease runs out meanwhile and let go
        once claimed; None when claimed, else why not (the guest then stays paused)."""
        why = self.keeper.claim(timeout, self.hold)
        if why is None:
            self.let_go()
        else:
            self.hold()
        return why


@dataclass(frozen=True)
class WitnessGate:
    """The backup's failover gate (receive/fence.py FailoverGate): resume only with the
    next generation from the witness."""

    client: WitnessClient
    holder: str
    timeout: float = GATE_TIMEOUT_S
    duration_s: float = LEASE_S

    @property
    def what(self) -> str:
        return f"the witness {self.client.what}"

    def run(self, domain: str | None, epoch: int, generation: int | None = None
            ) -> str | None:
        if not domain:
            return "cannot be asked: the stream named no domain"
        if generation is None:
            return "cannot be asked: the sender's protection carries no generation"
        want = generation + 1
        req = P.Request(P.ACQUIRE, domain, want, self.holder, round(self.duration_s * 1000))
        log.warning("failover: asking %s for %s generation %d (at most %g s)", self.what,
                    domain, want, self.timeout)
        t0 = time.monotonic()
        said = t0
        last = "no answer"
        while True:
            try:
                resp = self.client.call(req)
            except WitnessUnreachable as exc:
                last = str(exc)
            else:
                if resp.status == P.GRANTED:
                    log.warning("failover: %s granted generation %d in %.1f s", self.what,
                                want, time.monotonic() - t0)
                    return None
                if resp.status == P.STALE:
                    return f"refused generation {want}: {resp}"
                last = str(resp)
            now = time.monotonic()
            if now + RETRY_S > t0 + self.timeout:
                return f"did not grant generation {want} within {self.timeout:g} s ({last})"
            if now - said >= LOG_EVERY_S:
                said = now
                log.warning("failover: waiting for %s: %s", self.what, last)
            time.sleep(RETRY_S)
