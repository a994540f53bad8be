"""Helpers of the save engine (`xen_remus.save_continuous`): policy, page batches, guest types."""
