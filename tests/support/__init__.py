"""Harnesses, stand-in providers and wallets shared by the unit and the integration tests.

A test module imports these from here, never from another test module: a test file's own
helpers stay in it, and what several suites use lives in one place.
"""
