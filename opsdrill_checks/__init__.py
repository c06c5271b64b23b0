"""opsdrill's checks: the verification suite, one module per concern (``check_<area>_*``).

Run them with the plugin (``opsdrill_pytest``, loaded through its pytest11 entry point)
from any directory: ``pytest --pyargs opsdrill_checks --inventory prod.toml``. Each check
is a ``Check(...)`` with a stable id; ``docs/checks.md`` maps every id to its module.
"""
