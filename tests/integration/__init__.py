"""Tests against the local stack's real servers (marker ``integration``)."""
