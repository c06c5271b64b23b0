"""Load the opsdrill pytest plugin for both the checks and our own tests."""

pytest_plugins = ["fixtures.plugin", "fixtures.outcomes"]
