"""The Xen migration stream (xl header, libxl v2, libxc v3/v2), sans-IO.

``decoder.Decoder`` turns bytes into events (``events``, ``records``); ``encoder`` turns
typed bodies (``libxc_bodies``, ``libxl_bodies``) into writev buffers;
``io.iter_events``/``iter_records`` wrap the decoder around a file object for tools;
``consts`` holds the specs' tables.

No re-exports: ``consts``, ``events`` and ``errors`` are light (no numpy), and importing
them runs this file first; `xen-remus COMMAND --help` and the status and xl handshake
modules need only those.
"""
