"""Conformance suite: the checks of ``cylon_store.testing`` run for every backend in tests/servers
(``checks`` and ``tables`` here are the URL-form views other test modules import)."""
