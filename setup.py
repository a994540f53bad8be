"""xen-remus: Remus high availability for Xen guests, as a plugin to the stock toolstack."""
from setuptools import find_packages, setup

setup(
    name="xen-remus",
    version="0.1.0",
    description="Remus continuous checkpointing for Xen guests (Python, stock toolstack)",
    packages=find_packages(include=["xen_remus", "xen_remus.*"]),
    python_requires=">=3.11",
    install_requires=["pyxs>=0.4.1", "lz4>=4.0", "pyroute2>=0.7.2", "numpy>=1.24"],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "ruff", "mypy"]},
    entry_points={"console_scripts": ["xen-remus=xen_remus.migrate_hook:main"]},
)
