import itertools

from . import Backend

NAME = "file"


def start(tmp_path_factory) -> Backend:
    root = tmp_path_factory.mktemp("file-store")
    counter = itertools.count()
    # fsync off: the tests exercise visibility and atomicity, which rename gives either way.
    return Backend(NAME, lambda: f"file://{root}/s{next(counter)}?fsync=false",
                   traits={"processes": True})
