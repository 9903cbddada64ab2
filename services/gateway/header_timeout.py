"""A header-read timeout for the uvicorn server inside Ray Serve's HTTP proxy.

uvicorn has none: a client that sends a request's headers a byte at a time holds its connection (and a
file descriptor of the proxy) for as long as it likes, and Serve 2.60 starts its proxy's uvicorn with no
setting for it. The proxy imports its callback (services/gateway/proxy.py) in its own process before
that server starts, so the callback extends uvicorn's two HTTP/1.1 protocol classes there: when a
connection opens, and when a response on it ends, a timer starts; if no new request's headers have been
read when it fires, the client gets `408 Request Timeout` and the connection is closed. A request whose
headers arrived is never touched (its body has the gateway's own read timeout, `body_read_timeout_s`).
An idle keep-alive connection is closed earlier by uvicorn's keep-alive timeout, as before.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"connection: close\r\ncontent-length: 33\r\n\r\nrequest headers were not received")
_INSTALLED: dict[str, float] = {}


def _expire(protocol, cycle_at_start) -> None:
    transport = protocol.transport
    # A new request's headers make uvicorn create a new cycle: the same one means none arrived.
    if protocol.cycle is cycle_at_start and transport is not None and not transport.is_closing():
        transport.write(_TIMEOUT_RESPONSE)
        transport.close()


def _arm(protocol, seconds: float) -> None:
    protocol._header_timer = protocol.loop.call_later(seconds, _expire, protocol, protocol.cycle)


def _disarm(protocol) -> None:
    timer = getattr(protocol, "_header_timer", None)
    if timer is not None:
        timer.cancel()


def _extend(cls, seconds: float) -> None:
    connection_made, on_response_complete = cls.connection_made, cls.on_response_complete
    connection_lost = cls.connection_lost

    def made(self, transport):
        connection_made(self, transport)
        _arm(self, seconds)

    def response_complete(self):
        _disarm(self)
        on_response_complete(self)
        if not self.transport.is_closing():
            _arm(self, seconds)

    def lost(self, exc):
        _disarm(self)
        connection_lost(self, exc)

    cls.connection_made, cls.on_response_complete, cls.connection_lost = made, response_complete, lost


def install(seconds: float) -> bool:
    """Extends uvicorn's protocol classes in this process (once); False where they are not as expected
    (another uvicorn), with a warning and nothing changed."""
    if seconds <= 0 or _INSTALLED:
        return bool(_INSTALLED)
    try:
        from uvicorn.protocols.http.h11_impl import H11Protocol
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional for uvicorn; h11 alone still gets the timeout
        HttpToolsProtocol = None
        from uvicorn.protocols.http.h11_impl import H11Protocol
    classes = [cls for cls in (H11Protocol, HttpToolsProtocol) if cls is not None]
    needed = ("connection_made", "connection_lost", "on_response_complete")
    if not all(callable(getattr(cls, name, None)) for cls in classes for name in needed):
        logger.warning("uvicorn's protocol classes changed: no header read timeout")
        return False
    for cls in classes:
        _extend(cls, seconds)
        _INSTALLED[cls.__name__] = seconds
    return True
