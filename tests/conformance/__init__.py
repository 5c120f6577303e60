"""Conformance suite: plain check functions (``checks``) run for every backend in tests/servers."""
