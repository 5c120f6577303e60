"""The conformance checks of ``cylon_store.testing`` as functions of one store URL, the form
test_store.py runs them in (on shared ``memory://`` stores and a backend without optional
capabilities).  ``check_<name>(store_url, **options)`` is ``CHECKS[name](lambda: store_url,
**options)``: every check calls its URL factory once, so one URL is one fresh store.
"""

from __future__ import annotations

from cylon_store import testing


def _of_url(name):
    check = testing.CHECKS[name]

    def run(store_url: str, **options):
        return check(lambda: store_url, **options)

    run.__name__ = run.__qualname__ = check.__name__
    run.__doc__ = check.__doc__
    return run


for _name in testing.CHECKS:
    globals()[f"check_{_name}"] = _of_url(_name)

#: Checks that take only the store URL (``check_concurrent_writers`` also takes ``processes``,
#: ``check_large_payload`` is slow): what test_store.py runs for its extra stores.
URL_CHECKS = [globals()[f"check_{n}"] for n in testing.CHECKS
              if n not in testing.CROSS_PROCESS | testing.SLOW]
