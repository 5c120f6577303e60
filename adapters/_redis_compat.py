"""The redis-py internals the Redis adapter relies on — all of them, and nowhere else.

Why this module exists: the adapter's data path sends pipelined RESP commands on redis-py's
pooled connections and reads bulk replies straight from the socket into the result buffer (no
intermediate copy; see ``RespReader`` in ``redis.py``).  redis-py has no public API for reading
a reply into a caller's buffer, so that path needs a few of redis-py's private names and
unwritten behaviours.  They are confined to this module so that a redis-py upgrade is checked
in one file:

==============================  ==============================================================
internal                        used for
==============================  ==============================================================
``Connection._sock``            the connected socket the direct reader reads from; without it
                                (None: not connected, or a redis-py that keeps it elsewhere)
                                the adapter reads through ``read_response`` (one more copy)
``redis._parsers.base``         ``BaseParser.parse_error``: redis-py's own classification of an
                                error reply read by the direct reader, so that it raises the
                                same exception classes as ``read_response`` does
the reply kept in a plain       redis-py raises a plain ``ResponseError`` for an error code it
``ResponseError``               has no class for (BUSY, WRONGTYPE) and keeps the whole reply,
                                code first, as its message; ``error_code`` takes the code from
                                there (for codes it has a class for, ``status_code`` holds it)
no bytes buffered by the        the direct reader takes over the socket only when every earlier
parser between batches          reply of the connection was read, so redis-py's parser (hiredis
                                or the pure-Python one) holds no bytes the reader would miss
==============================  ==============================================================

Tested with redis-py 8.0.0, 8.0.1 and 8.1.0, each with hiredis 3.5 and with the pure-Python
parser (``tests/test_redis.py``, the conformance suite and the exchange model on Redis).  The
adapter also needs public API that redis-py 8.0 introduced — ``Connection.read_response(
timeout=...)``, which bounds the read of a blocking BLPOP — so releases before 8.0 do not work
(7.4: ``TypeError`` in ``wait``); hence the pin ``redis[hiredis]>=8.0,<8.2``.  Widening it: run
those suites against the new release and check the table above against its source.
"""

from __future__ import annotations

import socket
from typing import Optional


def socket_of(conn) -> Optional[socket.socket]:
    """The socket of a connected redis-py connection, or None (then use ``read_response``)."""
    return getattr(conn, "_sock", None)


def error_from_reply(message: str) -> Exception:
    """The exception redis-py raises for the error reply ``-message`` (its code first), of the
    same class as ``Connection.read_response`` would raise."""
    from redis._parsers.base import BaseParser
    return BaseParser.parse_error(message)


def error_code(exc: BaseException) -> Optional[str]:
    """The Redis error code of an error reply (``BUSY``, ``WRONGTYPE``...), or None.

    For the codes redis-py has a class for, the class says it all (and ``status_code``, where
    redis-py sets it, holds the code).  Otherwise redis-py raises a plain ``ResponseError`` whose message is the server's
    whole reply; by the protocol's convention its first word is the code (RESP "Simple errors":
    "the first upper-case word after the -, up to the first space or newline, represents the
    kind of error returned").  Only that word is returned — never the rest of the message.
    """
    from redis.exceptions import ResponseError

    code = getattr(exc, "status_code", None)
    if code:
        return code
    if type(exc) is not ResponseError or not exc.args or not isinstance(exc.args[0], str):
        return None
    word = exc.args[0].split(" ", 1)[0]
    return word if word.isupper() else None
