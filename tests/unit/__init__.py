"""Quick tests: no local stack, no container (marker ``unit``; ``make test-quick``)."""
