"""The direct TCP transport between protect (or migrate) and migrate-receive --listen:
a mutual pre-shared-key handshake (handshake.py, sans-IO), then the connection carries
what the ssh pipe carries (conn.py)."""
