"""opsdrill's checks: the verification suite, one module per concern (``check_<area>_*``).

Run them with the plugin (``opsdrill_pytest``, loaded through its pytest11 entry point)
from any directory: ``pytest --pyargs opsdrill_checks --inventory prod.toml``. Each check
is a ``Check(...)`` with a stable id; ``docs/checks.md`` maps every id to its module.

pytest imports every module here to collect it, whatever ``-m`` selects, so a module
imports at its top nothing that loads a client (the S3 SDK, psycopg, redis-py): facades
for annotations only (``TYPE_CHECKING``), and library modules that load a client inside
the checks that call them. A DNS-only run then loads none of them
(``tests/unit/test_collection_imports.py``).
"""
