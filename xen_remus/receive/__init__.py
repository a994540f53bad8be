"""The receive's I/O around the continuous restore (xen_remus/restore_continuous.py, the
sans-IO core): ``upstream`` (the sender's pipes, heartbeats back), ``xlsink`` (stock
`xl migrate-receive` that builds the guest, and its watchdog), ``driver`` (``receive``:
banner, stream, then the handshake or the failover, as the core decides)."""
