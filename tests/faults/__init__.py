"""Fault tests: a check made to fail or broken, a run killed, interrupted, starved or
racing another (marker ``faults``)."""
