"""xen-remus: Remus high availability for Xen guests, as a plugin to the stock toolstack.

The package metadata lives in pyproject.toml (PEP 621); this file lets `python setup.py`
and older tooling build the same package.
"""
from setuptools import setup

setup()
