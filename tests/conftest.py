"""Shared fixtures: every test has a timeout (pyproject sets the default)."""
