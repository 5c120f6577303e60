"""The adapter conformance suite, shipped: what every cylon-store backend must do, as plain
functions that a third-party adapter's own tests call.

The project runs these checks against every backend it ships (tests/conformance); an adapter
registered with ``cs.register(scheme, "module:Class")`` that passes all of them behaves as
the Store facade, the communicator and the kernel expect — atomic puts, exactly one winner of a
create race, plain-prefix sorted listing, every Arrow type round-tripped, damage detected,
streaming reads in bounded memory — in the same terms as memory://, file://, S3, DynamoDB and
Redis::

    import uuid, cylon_store as cs, cylon_store.testing as cst
    cs.register("toy", "toy_store:ToyAdapter")
    results = cst.run_all(lambda: f"toy://{uuid.uuid4().hex}")    # [Result(name, passed, error, seconds)]
    assert all(r.passed for r in results), [r for r in results if not r.passed]

Each check is ``CHECKS[name](make_url, capabilities=None)``:

- ``make_url()`` returns the URL of a fresh, empty, isolated store of the backend under test.
  A URL, not a Store, because a check opens several Stores on one store (with other options,
  from racing threads, pickled, in writer processes).  Each check calls it once and leaves what
  it wrote: give it disposable stores.
- ``capabilities`` (a ``cs.Capabilities``), when given, must equal what the store declares —
  pin it, and a declaration changed by accident fails instead of silently switching which half
  of a check runs.  None: whatever the store declares.

Guarantees: nothing is skipped — a capability the backend does not declare turns the part of a
check that needs it into a check that the backend refuses it with ``NotSupportedError`` (an
object above ``max_object_size``: ``PayloadTooLargeError``, nothing written); everything goes
through the public Store facade, but for ``capabilities``, which calls the adapter's optional
operations (notify/wait/incr/delete_counter) directly; fixed seeds, no hypothesis; failures
are ``AssertionError`` or what the backend raised.  Importing this package imports no pytest.
docs/conformance.md has the pytest recipe and what each capability flag changes.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, NamedTuple, Optional

from ..adapters.base import Capabilities
from . import checks, tables
from .checks import MakeUrl, assert_same, expect_capabilities, raises

#: Every conformance check by name (``check_<name>`` in ``checks``), in the order ``run_all``
#: runs them.  Each is ``fn(make_url, capabilities=None)``; ``concurrent_writers`` also takes
#: ``processes=`` (``run_check`` passes it).
CHECKS: dict[str, Callable] = {fn.__name__[len("check_"):]: fn for fn in (
    checks.check_roundtrip_all_types,
    checks.check_input_kinds,
    checks.check_empty_tables,
    checks.check_many_batches,
    checks.check_overwrite,
    checks.check_compression,
    checks.check_get_batches_bounded_memory,
    checks.check_create_mode,
    checks.check_concurrent_creators,
    checks.check_not_found,
    checks.check_delete,
    checks.check_list_prefix,
    checks.check_keys,
    checks.check_bad_data_nothing_written,
    checks.check_integrity,
    checks.check_pickle,
    checks.check_stats,
    checks.check_capabilities,
    checks.check_close,
    checks.check_concurrent_writers,
    checks.check_large_payload,
)}

#: Checks that move a lot of data: ``large_payload`` streams about 300 MiB through the store
#: (seconds on memory or file, half a minute against a local S3 server).  The project marks
#: them ``slow`` and still runs them in CI.
SLOW = frozenset({"large_payload"})

#: Checks that take ``processes=``: with it, writer processes open the same URL and race this
#: one (only for stores other OS processes can reach by URL: not plain ``memory://``).
CROSS_PROCESS = frozenset({"concurrent_writers"})


class Result(NamedTuple):
    name: str
    passed: bool
    #: The exception the check raised (None if it passed); its traceback is kept.
    error: Optional[BaseException]
    seconds: float


def run_check(name: str, make_url: MakeUrl, capabilities: Optional[Capabilities] = None, *,
              processes: bool = False) -> None:
    """Run the check ``name`` (a key of ``CHECKS``); it raises if the backend fails it.
    ``processes=True`` says other OS processes can open ``make_url()``'s stores (checks in
    ``CROSS_PROCESS`` then race writer processes too; the others ignore it)."""
    try:
        check = CHECKS[name]
    except KeyError:
        raise ValueError(f"no conformance check {name!r}; the checks: {', '.join(CHECKS)}") from None
    if name in CROSS_PROCESS:
        check(make_url, capabilities, processes=processes)
    else:
        check(make_url, capabilities)


def run_all(make_url: MakeUrl, capabilities: Optional[Capabilities] = None, *,
            processes: bool = False, names: Optional[Iterable[str]] = None,
            failfast: bool = False) -> list[Result]:
    """Run every check (or those in ``names``, in ``CHECKS`` order) and return one ``Result``
    each.  ``failfast``: re-raise the first failure instead (with a note naming the check).
    ``KeyboardInterrupt`` and other non-``Exception`` errors always propagate."""
    wanted = list(CHECKS) if names is None else list(names)
    unknown = [n for n in wanted if n not in CHECKS]
    if unknown:
        raise ValueError(f"no conformance check {', '.join(map(repr, unknown))}; the checks: "
                         f"{', '.join(CHECKS)}")
    results = []
    for name in (n for n in CHECKS if n in wanted):
        start = time.perf_counter()
        try:
            run_check(name, make_url, capabilities, processes=processes)
        except Exception as exc:
            if failfast:
                if hasattr(exc, "add_note"):  # Python >= 3.11
                    exc.add_note(f"in cylon_store.testing conformance check {name!r}")
                raise
            results.append(Result(name, False, exc, time.perf_counter() - start))
        else:
            results.append(Result(name, True, None, time.perf_counter() - start))
    return results


__all__ = ["CHECKS", "SLOW", "CROSS_PROCESS", "Result", "run_check", "run_all", "raises",
           "assert_same", "expect_capabilities", "MakeUrl", "checks", "tables"]
