"""The conformance tables now ship in ``cylon_store.testing.tables``; kept for the test modules
that import them from here (test_codec, test_store)."""

from cylon_store.testing.tables import all_types_table, batched, numeric_rows, numeric_table  # noqa: F401
