"""A fault-injecting HTTP reverse proxy on loopback, for S3 reliability tests: :class:`FaultProxy`.

Requests are forwarded unchanged to an upstream server (the moto S3 server), with their original
``Host`` header, so a SigV4 signature made for the proxy's ``host:port`` still matches; ``Range``,
``Authorization`` and every other end-to-end header pass through, and bodies are streamed. A
:class:`Fault` answers requests that match it (method, and a substring of the path) with an error
status and an S3-style XML error body instead of forwarding them, for its first ``times`` matches
or for ever; :attr:`Fault.injected` counts what it answered.

The proxy serves from threads of the test process: use it only with clients that run in another
process (``geoseg`` as a subprocess), since rasterio may call GDAL while holding the GIL.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Headers that belong to one connection, not to the request: never forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_CHUNK = 64 * 1024
_S3_CODES = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
    429: ("TooManyRequests", "Too many requests; slow down."),
}


@dataclass
class Fault:
    """Answer matching requests with ``statuses`` (in turn) for the first ``times`` of them (all
    of them when ``times`` is None), after letting the first ``skip`` through. A request matches
    when its method is in ``methods`` and ``path`` is a substring of its path (``""``: all).

    With ``per_range`` the ``times`` count per distinct request (method, path and ``Range``
    header): every read then fails ``times`` times before its retry gets through, whichever
    process or thread sends it.
    """

    path: str = ""
    statuses: tuple[int, ...] = (503,)
    times: int | None = None
    methods: tuple[str, ...] = ("GET",)
    skip: int = 0
    per_range: bool = False
    injected: int = 0
    injected_statuses: list[int] = field(default_factory=list)
    _counts: dict[tuple[str, str, str], int] = field(default_factory=dict, repr=False)

    def take(self, method: str, path: str, range_: str) -> int | None:
        """The status to answer with, counting it; None to forward. Called under the lock."""
        if method not in self.methods or self.path not in path:
            return None
        if self.skip > 0:
            self.skip -= 1
            return None
        key = (method, path, range_) if self.per_range else ("", "", "")
        count = self._counts.get(key, 0)
        if self.times is not None and count >= self.times:
            return None
        self._counts[key] = count + 1
        status = self.statuses[count % len(self.statuses)]
        self.injected += 1
        self.injected_statuses.append(status)
        return status


@dataclass(frozen=True)
class Request:
    """A request the proxy answered: ``fault`` is the Fault that answered it, None if forwarded."""

    method: str
    path: str
    range: str  # the Range header, "" if none
    status: int
    fault: Fault | None


class FaultProxy:
    """A reverse proxy to ``upstream`` (``http://host:port``) on 127.0.0.1, with faults."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        assert parts.scheme == "http" and parts.hostname, upstream
        self.upstream = (parts.hostname, parts.port or 80)
        self.faults: list[Fault] = []
        self.requests: list[Request] = []  # every request, in the order answered
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _decide(self, method: str, path: str, range_: str) -> tuple[int, Fault] | None:
        with self._lock:
            for fault in self.faults:
                status = fault.take(method, path, range_)
                if status is not None:
                    return status, fault
        return None

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    """A started :class:`FaultProxy` to ``upstream``, stopped on exit."""
    proxy = FaultProxy(upstream).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as curl and botocore expect

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: the test reads proxy.requests instead

        def _relay(self) -> None:
            range_ = self.headers.get("Range", "")
            decided = proxy._decide(self.command, self.path, range_)
            if decided is not None:
                status, fault = decided
                self._drain_body()
                self._fault(status)
                proxy._record(Request(self.command, self.path, range_, status, fault))
            else:
                status = self._forward()
                proxy._record(Request(self.command, self.path, range_, status, None))

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay

        def _request_body(self) -> Iterator[bytes]:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return
                    yield self.rfile.read(size)
                    self.rfile.readline()  # the CRLF after each chunk
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(_CHUNK, remaining))
                if not chunk:
                    raise ConnectionError("client closed the connection mid-body")
                remaining -= len(chunk)
                yield chunk

        def _drain_body(self) -> None:
            for _ in self._request_body():
                pass

        def _fault(self, status: int) -> None:
            code, message = _S3_CODES.get(status, ("ServiceUnavailable", "Injected fault."))
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                f"<Resource>{self.path.split('?')[0]}</Resource>"
                "<RequestId>faultproxy</RequestId></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            if status in (429, 503):
                self.send_header("Retry-After", "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _forward(self) -> int:
            headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
            chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                # Host is among the headers: http.client then sends it as is (no own Host).
                upstream.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for name, value in headers:
                    upstream.putheader(name, value)
                if chunked:
                    upstream.putheader("Transfer-Encoding", "chunked")
                upstream.endheaders()
                for chunk in self._request_body():
                    upstream.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                if chunked:
                    upstream.send(b"0\r\n\r\n")
                response = upstream.getresponse()
                self._relay_response(response)
                return response.status
            finally:
                upstream.close()

        def _relay_response(self, response: http.client.HTTPResponse) -> None:
            length = response.getheader("Content-Length")
            body = None
            if length is None and self.command != "HEAD":
                body = response.read()  # chunked or until close: relay with a length
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP and name.lower() not in ("date", "server"):
                    self.send_header(name, value)
            if body is not None:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "HEAD" or response.status in (204, 304):
                return
            if body is not None:
                self.wfile.write(body)
                return
            while chunk := response.read(_CHUNK):
                self.wfile.write(chunk)

    return Handler
