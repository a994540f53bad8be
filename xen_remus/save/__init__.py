"""The one-shot save: the engine (engine.py), what it needs from Xen and the stream (ops.py),
the guest types (pv.py, hvm.py), pages and pre-copy policy, the file/pipe Emitter and the
xl migration transport. The continuous save builds on it (`xen_remus.save_continuous`)."""
