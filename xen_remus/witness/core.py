"""The witness's decisions, sans-IO: one lease per guest name, times given to it.

A record says which host (holder) may run the guest, for which generation of its
protection (generation.py), until when. The rules:

- a generation lower than the record's is refused (STALE), whoever asks;
- the holder may take its lease again (renew, re-acquire after it ran out: nobody else
  took it meanwhile) and take a higher generation at once (it is the copy that runs);
- another host gets a *higher* generation only once the holder's lease has run out plus
  ``grace`` (the holder stops its guest's output before its own count of the lease ends,
  counted from when it sent its request: earlier than ours) or was released; the same
  generation is never another's (STALE): a backup fails over as generation + 1, and a
  primary that lost its backup claims generation + 1 first, so only one of them wins.

Records survive a restart of the witness (store.py) without their expiry (monotonic time
does not): a restored lease counts as renewed at the restart, so a holder that renewed just
before the crash is not overtaken.
"""

from __future__ import annotations

from dataclasses import dataclass

from xen_remus.witness import proto as P

GRACE_S = 2.0
DURATION_MIN_MS = 1_000
DURATION_CAP_MS = 300_000


@dataclass(frozen=True)
class Saved:
    """What store.py keeps of a record."""

    holder: str
    generation: int
    duration_ms: int
    released: bool = False


@dataclass
class Lease:
    holder: str
    generation: int
    duration_ms: int
    expires: float  # the witness's monotonic clock, s
    released: bool = False

    def saved(self) -> Saved:
        return Saved(self.holder, self.generation, self.duration_ms, self.released)

    def record(self, now: float) -> P.Record:
        left = 0 if self.released else max(0, round((self.expires - now) * 1000))
        return P.Record(self.holder, self.generation, left, self.released)


class WitnessCore:
    def __init__(self, grace_s: float = GRACE_S, cap_ms: int = DURATION_CAP_MS) -> None:
        self.grace_s, self.cap_ms = grace_s, cap_ms
        self.leases: dict[str, Lease] = {}

    def restore(self, saved: dict[str, Saved], now: float) -> None:
        for guest, s in saved.items():
            self.leases[guest] = Lease(s.holder, s.generation, s.duration_ms,
                                       now if s.released else now + s.duration_ms / 1000,
                                       s.released)

    def handle(self, req: P.Request, now: float) -> tuple[P.Response, Saved | None]:
        """The answer to ``req`` at ``now``, and the record to persist before it is sent
        (None: nothing that must outlive a restart changed)."""
        if req.op != P.QUERY and not req.holder:
            return P.Response(P.DENIED, message="no holder named"), None
        rec = self.leases.get(req.guest)
        if req.op == P.QUERY:
            return P.Response(P.INFO, record=rec.record(now) if rec else None), None
        if req.op == P.ACQUIRE:
            return self._acquire(req, rec, now)
        if rec is None or rec.holder != req.holder or rec.generation != req.generation:
            return self._not_holder(req, rec, now), None
        if req.op == P.RENEW:
            return self._grant(req, rec, now)
        rec.released, rec.expires = True, now
        return P.Response(P.GRANTED, record=rec.record(now),
                          message="released"), rec.saved()

    def _acquire(self, req: P.Request, rec: Lease | None, now: float
                 ) -> tuple[P.Response, Saved | None]:
        if rec is None:
            return self._grant(req, None, now)
        if req.generation < rec.generation:
            return P.Response(P.STALE, record=rec.record(now), message=(
                f"generation {req.generation} is lower than the record's")), None
        if req.holder == rec.holder:
            return self._grant(req, rec, now)
        if req.generation == rec.generation:
            return P.Response(P.STALE, record=rec.record(now), message=(
                f"generation {req.generation} is another holder's; taking over needs a "
                "higher one")), None
        free_at = rec.expires + (0.0 if rec.released else self.grace_s)
        if now < free_at:
            return P.Response(P.BUSY, record=rec.record(now), message=(
                f"free in {(free_at - now) * 1000:.0f} ms unless {rec.holder!r} renews")
            ), None
        return self._grant(req, rec, now)

    def _grant(self, req: P.Request, rec: Lease | None, now: float
               ) -> tuple[P.Response, Saved | None]:
        dur = min(max(req.duration_ms, DURATION_MIN_MS), self.cap_ms)
        new = Lease(req.holder, req.generation, dur, now + dur / 1000)
        changed = rec is None or rec.saved() != new.saved()
        self.leases[req.guest] = new
        return P.Response(P.GRANTED, dur, new.record(now)), new.saved() if changed else None

    def _not_holder(self, req: P.Request, rec: Lease | None, now: float) -> P.Response:
        if rec is None:
            return P.Response(P.DENIED, message=f"no lease of {req.guest!r} to "
                              f"{P.OP_NAMES[req.op]}")
        if rec.generation > req.generation or (rec.generation == req.generation
                                               and rec.holder != req.holder):
            return P.Response(P.STALE, record=rec.record(now), message=(
                f"generation {req.generation} of {req.holder!r} is not the current one"))
        return P.Response(P.DENIED, record=rec.record(now), message=(
            f"{req.holder!r} does not hold generation {req.generation}"))
