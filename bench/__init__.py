"""Benchmarks: ``python -m bench [SECTION...]`` (``make bench``).

A section is a module here listed in SECTIONS with ``run() -> dict[str, float]``; each
figure is printed on its own line. A section may declare ``TARGETS = {figure: (">=" or
"<=", bound)}``; the runner prints PASS/FAIL for each and exits 1 if any fails. Ratios to a
baseline measured in the same run are figures of their own (named ``*_vs_*``/``*_ratio``),
so a loaded machine slows both sides alike.
"""

SECTIONS: tuple[str, ...] = ("codec", "pagetable", "save", "compress", "remus", "disk")
# With --lab (``make bench``): sections with ``lab_figures(host)`` and ``LAB_TARGETS``, run
# on one real-Xen lab host, ours against the stock C tools in the same run.
LAB_SECTIONS: tuple[str, ...] = ("save", "remus", "failover")
