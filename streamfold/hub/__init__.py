"""Floor 3: Hub I/O only: resolving and downloading sources, range reads of remote shards, pushes."""
