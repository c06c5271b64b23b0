"""What several test modules share: fault injectors, fakes, the proof registry, the
container harness (fixtures themselves live in ``tests/conftest.py``)."""
