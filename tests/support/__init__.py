"""Harnesses, stand-in providers, wallets, servers and ports shared across the test modules
(unit, integration, faults, deploy): some by several suites, some by several modules of one.

A test module imports these from here, never from another test module: a test file's own
helpers stay in it, and what several suites use lives in one place.
"""
