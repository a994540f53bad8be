"""The witness: a third party both hosts of a protection reach, which decides which copy of
a guest may run (README, "Split brain and fencing").

`proto.py` (frames, authentication, messages) and `core.py` (the leases) are sans-IO;
`store.py` keeps the records across restarts, `server.py` serves them (asyncio),
`client.py` reaches a witness, `lease.py` is what protect and migrate-receive do with it.
"""
