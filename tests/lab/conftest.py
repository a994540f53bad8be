"""Fixtures for the end-to-end tests on real Xen (the QEMU lab, see lab/README.md).

- ``lab_one``: host A (a running ``lab.host.Host``);
- ``lab_two``: a ``lab.lab.Lab`` with hosts A and B linked (``.a``, ``.b``);
- ``witnessed_lab``: a two-host lab of its own whose hosts reach a witness on this machine
  (lab/witness.py).

One lab serves the whole session (boots are the slow part): two hosts if any selected test
asks for ``lab_two``, else one. A test that killed a host gets a fresh lab for the next test.
Every lab test runs under a time bound: ``@pytest.mark.lab(timeout=SECONDS)`` (default 600);
a failing lab test prints the hosts' serial and xl logs. If QEMU or Xen cannot start, the
tests fail with the reason (never skip).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Generator, Iterator
from types import FrameType

import pytest
from _pytest.runner import runtestprotocol

from lab.host import Host
from lab.lab import Lab
from lab.witness import WitnessedLab
from lab.witness import witnessed_lab as _witnessed_lab

DEFAULT_TIMEOUT_S = 600
_state: dict[str, object] = {"lab": None, "want": 1}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if any("lab_two" in getattr(item, "fixturenames", ()) for item in items):
        _state["want"] = 2


def _lab(n: int) -> Lab:
    lab = _state["lab"]
    if isinstance(lab, Lab):
        if lab.nhosts >= n and all(h.alive() for h in lab.hosts.values()):
            return lab
        lab.stop()
        _state["lab"] = None
    want = _state["want"]
    lab = Lab(max(n, want if isinstance(want, int) else 1))
    lab.start()
    _state["lab"] = lab
    return lab


@pytest.fixture(scope="session")
def _lab_session() -> Iterator[None]:
    yield
    lab = _state["lab"]
    if isinstance(lab, Lab):
        lab.stop()


@pytest.fixture
def lab_one(_lab_session: None) -> Host:
    return _lab(1).a


@pytest.fixture
def lab_two(_lab_session: None) -> Lab:
    return _lab(2)


@pytest.fixture
def witnessed_lab() -> Iterator[WitnessedLab]:
    with _witnessed_lab() as w:
        yield w


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A lab test that boots its own Lab needs the shared one stopped first (one lab at a time)."""
    names = set(getattr(item, "fixturenames", ()))
    lab = _state["lab"]
    if item.get_closest_marker("lab") and not names & {"lab_one", "lab_two"} and isinstance(
            lab, Lab):
        lab.stop()
        _state["lab"] = None


class LabTimeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    marker = item.get_closest_marker("lab")
    if marker is None:
        yield
        return
    limit = int(marker.kwargs.get("timeout", DEFAULT_TIMEOUT_S))

    def expire(signum: int, frame: FrameType | None) -> None:
        raise LabTimeout(f"{item.nodeid} exceeded its {limit} s time bound")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[
        None, pytest.TestReport, None]:
    outcome = yield
    report = outcome.get_result()
    lab = _state["lab"]
    if report.failed and item.get_closest_marker("lab") and isinstance(lab, Lab):
        report.sections.append(("lab logs", lab.logs()))


# dom0 memory corruption under TCG (lab/README.md, "Known problems"): processes of dom0
# fault with no fault of the code under test. A lab test that fails while its dom0 showed
# this gets ONE more run on a freshly booted lab; the first failure stays in the output.
DOM0_FAULT = re.compile(r"segfault at|general protection fault|SystemError: unknown slot")


def _dom0_faults() -> int:
    lab = _state["lab"]
    if not isinstance(lab, Lab):
        return 0
    # Every serial log of the run: a host booted again (Lab.restart) keeps its old one.
    return sum(len(DOM0_FAULT.findall(p.read_text(errors="replace")))
               for p in lab.rundir.glob("serial-*.log"))


def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if item.get_closest_marker("lab") is None:
        return None
    hook = item.ihook
    hook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    before = _dom0_faults()
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    faults = _dom0_faults() - before
    if faults and any(r.failed for r in reports):
        for r in reports:
            if r.failed:
                print(f"\n[lab] {item.nodeid} failed ({r.when}) while dom0 showed {faults} "
                      f"process fault(s) (TCG corruption, lab/README.md); first failure:\n"
                      f"{r.longreprtext[-3000:]}\n[lab] rerunning once on a fresh lab")
        lab = _state["lab"]
        if isinstance(lab, Lab):
            lab.stop()
            _state["lab"] = None
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
    if any(r.failed for r in reports) or _dom0_faults() > before:
        # A failed test may leave guests, stuck xl or a faulted dom0 behind: the next test
        # gets a freshly booted lab rather than inherit them.
        lab = _state["lab"]
        if isinstance(lab, Lab):
            lab.stop()
            _state["lab"] = None
    for r in reports:
        hook.pytest_runtest_logreport(report=r)
    hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
