"""A fault-injecting HTTP proxy in front of the test S3 server: the flaky object store of a busy cluster.

Every request is forwarded unchanged (headers, body, signature) to the real S3 endpoint.
Inside ``flaky(failure_rate)``, that share of the requests fails, in turn: ``503 SlowDown``
before the request reaches the server, as S3 fails under load; two failures that half happen,
as a network does: the request is applied by the server and the client sees its connection
reset (``applied-reset``), or the answer's body is cut off halfway (``truncated``; an answer
with no body to cut is reset instead, and the next answer with a body in the block is cut
off: which requests carry bodies depends on the interleaving, the cut must not); then ``500 InternalError`` and a connection reset,
before the request reaches the server. The schedule is fixed (every 1/rate-th request,
starting with the first in the block), so even a step that makes a handful of requests
meets a failure; which request that is depends on how the client's threads interleave.
On that schedule POST requests (the multipart-upload calls) only fail before they are
applied; ``multipart_faults(fault)`` aims a fault at them instead: the first
CreateMultipartUpload, UploadPart and CompleteMultipartUpload inside the block each meet
it once (a CompleteMultipartUpload the server applied and the client never heard, then
retried, is the window). ``delay_rate`` delays requests instead. Counts of what was done
are in ``stats``.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import urlparse

_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
}
_FAULTS = ("503", "applied-reset", "truncated", "500", "reset")
_HALF_DONE = {"applied-reset", "truncated"}
MULTIPART_CALLS = ("create", "part", "complete")  # CreateMultipartUpload, UploadPart, CompleteMultipartUpload
# Hop-by-hop headers are the proxy's own business, never forwarded.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultyS3Proxy:
    """A threaded proxy on 127.0.0.1 forwarding to ``upstream``; ``url`` is its endpoint."""

    def __init__(self, upstream: str):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.failure_rate = 0.0
        self.delay_rate = 0.0
        self.stats = {"requests": 0, **{fault: 0 for fault in _FAULTS}, "delayed": 0}
        self._in_block = 0  # requests seen inside the current flaky() block
        self._owed_truncations = 0  # truncations that met an answer without a body, owed to the next one with one
        self._multipart: dict[str, str] = {}  # multipart call -> the fault it still has to meet
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy", daemon=True)

    @property
    def url(self) -> str:
        """The proxy's endpoint, for AWS_ENDPOINT_URL."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultyS3Proxy":
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    @contextlib.contextmanager
    def flaky(self, failure_rate: float = 0.1, delay_rate: float = 0.1) -> Iterator[dict[str, int]]:
        """Fail ``failure_rate`` and delay ``delay_rate`` of the requests inside the block; yields counts for it."""
        with self._lock:
            before = dict(self.stats)
            self.failure_rate, self.delay_rate, self._in_block = failure_rate, delay_rate, 0
            self._owed_truncations = 0
        during: dict[str, int] = {}
        try:
            yield during
        finally:
            with self._lock:
                self.failure_rate = self.delay_rate = 0.0
                self._owed_truncations = 0
                during.update({key: self.stats[key] - before[key] for key in self.stats})

    @contextlib.contextmanager
    def multipart_faults(self, fault: str = "applied-reset") -> Iterator[dict[str, int]]:
        """The first create, part upload and complete call of a multipart upload in the block each meet ``fault``
        (one of _FAULTS) once; yields the calls that met it, by name."""
        met: dict[str, int] = {}
        with self._lock:
            self._multipart = {call: fault for call in MULTIPART_CALLS}
        try:
            yield met
        finally:
            with self._lock:
                met.update({call: 1 for call in MULTIPART_CALLS if call not in self._multipart})
                self._multipart = {}

    def _aimed(self, method: str, path: str) -> str | None:
        """The fault a multipart_faults() block aims at this request, if any (each call once)."""
        query = urlparse(path).query
        call = ("create" if method == "POST" and "uploads" in query.split("&") else
                "complete" if method == "POST" and "uploadId=" in query else
                "part" if method == "PUT" and "uploadId=" in query else None)
        with self._lock:
            return self._multipart.pop(call, None) if call else None

    def _decide(self, method: str) -> tuple[str | None, float]:
        """This request's fault (one of _FAULTS or None) and delay in seconds, on the fixed schedule."""
        with self._lock:
            self.stats["requests"] += 1
            number, self._in_block = self._in_block, self._in_block + 1
            fault, delay = None, 0.0
            if self.failure_rate > 0:
                period = max(1, round(1 / self.failure_rate))
                if number % period == 0:
                    fault = _FAULTS[(number // period) % len(_FAULTS)]
                    if fault in _HALF_DONE and method == "POST":
                        fault = "reset"
                    if fault not in _HALF_DONE:  # those are counted once done: a body may be too short to cut
                        self.stats[fault] += 1
            if fault is None and self.delay_rate > 0:
                period = max(1, round(1 / self.delay_rate))
                if number % period == period // 2:
                    delay = 0.05 + 0.35 * ((number // period) % 4) / 3  # 50 to 400 ms
                    self.stats["delayed"] += 1
            return fault, delay

    def _count(self, fault: str) -> None:
        """Count a fault that was done after forwarding."""
        with self._lock:
            self.stats[fault] += 1

    def _after_forwarding(self, fault: str | None, method: str, has_body: bool) -> str | None:
        """The half-done fault an answer meets: a truncation with no body to cut resets it instead and is owed to
        the next answer with a body inside the block, which is cut off (a fault-free one only)."""
        with self._lock:
            if fault == "truncated" and (method == "HEAD" or not has_body):
                self._owed_truncations += 1
                return "applied-reset"
            if fault is None and self._owed_truncations and method == "GET" and has_body and self.failure_rate > 0:
                self._owed_truncations -= 1
                return "truncated"
            return fault

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # the test output stays quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reset(self) -> None:
                """An abrupt close (RST), as a dropped connection looks to the client."""
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _forward(self) -> None:
                body = self._body()
                fault, delay = proxy._decide(self.command)
                fault = proxy._aimed(self.command, self.path) or fault
                if fault == "reset":
                    self._reset()
                    return
                if fault is not None and fault not in _HALF_DONE:
                    code, message = _ERRORS[int(fault)]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{message}</Message></Error>").encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                if delay:
                    threading.Event().wait(delay)
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            upstream.putheader(name, value)
                    upstream.putheader("Content-Length", str(len(body)))
                    upstream.endheaders(body)
                    response = upstream.getresponse()
                    payload = response.read()
                    fault = proxy._after_forwarding(fault, self.command, bool(payload))
                    if fault is not None:
                        proxy._count(fault)
                    if fault == "applied-reset":
                        self._reset()  # the server applied it; the client never hears so
                        return
                    self.send_response(response.status, response.reason)
                    for name, value in response.getheaders():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    # A HEAD answer carries the object's length, with no body.
                    length = response.getheader("Content-Length") if self.command == "HEAD" else len(payload)
                    self.send_header("Content-Length", str(length if length is not None else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        # truncated: the headers promise the whole body, half of it comes, then the connection goes
                        self.wfile.write(payload[:len(payload) // 2] if fault == "truncated" else payload)
                        if fault == "truncated":
                            self._reset()
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler
