import uuid

from . import Backend

NAME = "memory"


def start(tmp_path_factory) -> Backend:
    return Backend(NAME, lambda: f"memory://t-{uuid.uuid4().hex[:12]}", traits={"processes": False})
