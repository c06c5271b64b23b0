"""PostgreSQL backups: backup, restore, the drill and its guards, prune and retention, and
the catalog, manifests, locks and uploads they share."""
