"""The `xen-remus` sub-commands, one module per command group (entry point: migrate_hook)."""
