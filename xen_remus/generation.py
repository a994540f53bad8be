"""Generations: which copy of a protected domain is the current one.

Each protection carries a generation number (u64, in its REMUS_ACCEPT). Each host keeps,
per domain name, the last generation it made or saw, in STATE_DIR/generations (kept
across reboots: a backup that reboots after a failover must still know it):
- protect starts protection max(record, 0) + 1 and records it (``protect``);
- a receiver records the generation it accepted (``received``);
- a backup that fails over runs a copy of its own: it records generation + 1
  (``failover``), before it resumes it.
A receiver refuses a sender whose generation is lower than its record: a stale primary
(it ran on through a partition while this host failed over) reconnecting with its old
protection. It also refuses one equal to a failover's record: the copy resumed here *is*
that generation, and a sender claiming it comes from a copy that does not descend from it
(the old primary starting a new protection after the failover: its own record is one
behind, so it counts to the same number). Equal to a ``protect`` or ``received`` record is
accepted: protect and its receiver on one host (a loopback test) share the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from xen_remus.channel.errors import ChannelError
from xen_remus.errors import XenRemusError
from xen_remus.fdio import replace_durably
from xen_remus.paths import state_dir

ORIGINS = ("protect", "received", "failover")
GENERATION_MAX = (1 << 64) - 1
_SAID = {"protect": "started protecting it as generation",
         "received": "already received generation",
         "failover": "failed over and resumed its own copy as generation"}


class GenerationError(XenRemusError):
    """A generation record that cannot be read or written (names the file)."""


class GenerationRefused(ChannelError):
    """The sender's generation is not newer than this host's copy (or this host cannot
    tell): refused."""


@dataclass(frozen=True)
class Generation:
    number: int
    origin: str  # one of ORIGINS: what made the record


def refusal(name: str, offered: int | None, recorded: Generation | None) -> str | None:
    """Why a sender of ``offered`` for domain ``name`` is refused, or None."""
    if recorded is None:
        return None
    said = f"this host {_SAID[recorded.origin]} {recorded.number}"
    if offered is None:
        return (f"the sender's protection of {name} carries no generation (an older "
                f"xen-remus?), but {said}")
    if offered < recorded.number or (offered == recorded.number
                                     and recorded.origin == "failover"):
        return (f"the sender's protection of {name} is generation {offered}, but {said}: "
                "the sender's copy is stale (it ran on while this host took over)")
    return None


class GenerationStore:
    """The records of one host, one file per domain name."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else state_dir() / "generations"

    def path(self, name: str) -> Path:
        return self.directory / f"{quote(name, safe='')}.generation"

    def get(self, name: str) -> Generation | None:
        path = self.path(name)
        try:
            text = path.read_text("ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise GenerationError(f"cannot read the generation record {path}: {exc}"
                                  ) from None
        words = text.split()
        try:
            gen = Generation(int(words[0]), words[1])
            if gen.origin not in ORIGINS or not 0 <= gen.number <= GENERATION_MAX:
                raise ValueError
        except (IndexError, ValueError):
            raise GenerationError(f"generation record {path}: expected 'NUMBER ORIGIN' "
                                  f"(ORIGIN one of {', '.join(ORIGINS)}), got {text[:60]!r}"
                                  ) from None
        return gen

    def put(self, name: str, number: int, origin: str) -> Generation:
        """Record ``number`` for ``name`` (never lowering a record: a higher one stays);
        the record in force afterwards. Written atomically and synced: it must outlive
        a crash of this host."""
        assert origin in ORIGINS
        if not 0 <= number <= GENERATION_MAX:
            raise GenerationError(f"generation {number} of {name} is not a u64")
        old = self.get(name)
        if old is not None and old.number > number:
            return old
        new = Generation(number, origin)
        path = self.path(name)
        try:
            replace_durably(path, f"{number} {origin}\n".encode())
        except OSError as exc:
            raise GenerationError(f"cannot write the generation record {path}: {exc}"
                                  ) from None
        return new

    def start_protection(self, name: str) -> int:
        """The generation of a new protection of ``name`` from this host, recorded."""
        old = self.get(name)
        number = (old.number if old is not None else 0) + 1
        self.put(name, number, "protect")
        return number

    def check_sender(self, name: str, offered: int | None) -> None:
        """Refuse (GenerationRefused) a sender of ``offered``; else record it as received."""
        try:
            why = refusal(name, offered, self.get(name))
        except GenerationError as exc:
            raise GenerationRefused(f"{exc}: refusing the sender until it is fixed") from None
        if why is not None:
            raise GenerationRefused(f"{why}. If the copy here is gone and the sender's is the "
                                  f"one to keep, remove {self.path(name)} on this host and "
                                  "start protect again")
        if offered is not None:
            try:
                self.put(name, offered, "received")
            except GenerationError as exc:
                raise GenerationRefused(f"{exc}: refusing the sender, whose generation "
                                        "could not be recorded") from None

    def failed_over(self, name: str, generation: int) -> int:
        """This host resumes its copy of protection ``generation``: its own generation."""
        number = min(generation + 1, GENERATION_MAX)
        self.put(name, number, "failover")
        return number
