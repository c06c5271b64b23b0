"""The files bucket: the incremental off-site mirror and what judges it."""
