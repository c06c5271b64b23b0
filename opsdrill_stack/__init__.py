"""The local stack: real servers on 127.0.0.1 that stand in for production.

Its own package and distribution beside the library, never imported by it nor shipped in
its wheel: the stack imports opsdrill (to prime itself with the real operations) and plugs
``opsdrill stack`` into its CLI (``cli``, an ``opsdrill.commands`` entry point). The stack
itself is ``local.LocalStack``; each server is a ``daemon.Daemon``. Nothing is imported
here, so the CLI loading its ``stack`` command stays quick.
"""
