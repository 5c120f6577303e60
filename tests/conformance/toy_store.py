"""A third party's adapter, as docs/conformance.md registers one: file storage under its own
scheme ``toy://``, declaring only create-if-absent, streaming puts and a 64 MiB object limit, so
the shipped suite meets every "not declared: NotSupportedError" branch and the
PayloadTooLargeError one through ``cs.register("toy", "conformance.toy_store:ToyAdapter")``."""

from __future__ import annotations

import cylon_store as cs
from cylon_store.adapters.file import FileAdapter

#: What one toy object may hold.
LIMIT = 64 << 20


class ToyAdapter(FileAdapter):
    scheme = "toy"
    capabilities = cs.Capabilities(conditional_create=True, streaming_put=True, max_object_size=LIMIT)

    def __init__(self, location, config, stats, *, options=None):
        super().__init__(location, config, stats, backend="toy", options=options)

    def put(self, key, chunks, mode=cs.PutMode.OVERWRITE):
        def limited():  # refused while streaming: the file adapter then removes what it wrote
            total = 0
            for chunk in chunks:
                total += memoryview(chunk).nbytes
                if total > LIMIT:
                    raise cs.PayloadTooLargeError(f"a toy object holds at most {LIMIT} bytes",
                                                  backend="toy", op="put", key=key)
                yield chunk
        return super().put(key, limited(), mode)
