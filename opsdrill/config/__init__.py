"""The inventory: one model of every target (``inventory``, with its mail and probe
sections in ``mail`` and ``probes`` and the field types they share in ``fields``), and the
one reader of .env files and env sources (``envfile``). Imports only errors and redact."""
