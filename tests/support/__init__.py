"""Helpers shared by the test suites: ports and processes (procs.py)."""
