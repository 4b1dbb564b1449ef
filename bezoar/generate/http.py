"""A lean HTTP/1.1 keep-alive client for the compat provider: POST a JSON body, read the answer.

Why not aiohttp: against a local inference server the client's CPU per request is what caps the
pool (client and server share the machine). aiohttp spends about 450 us of CPU on one POST;
this client, an ``asyncio.Protocol`` per connection with a parser that handles only what an
API answer needs, spends a fraction of that (see bench/pool.py). It keeps what matters for
robustness:

- connections reused per endpoint (HTTP/1.1 keep-alive), most recently used first; a connection
  the server closes while idle is dropped from the pool as soon as its FIN arrives, and one idle
  longer than ``keepalive_s`` is closed by us before reuse;
- answers framed by Content-Length, by chunked transfer coding (trailers skipped), or by the end
  of the connection; 1xx interim answers skipped; gzip / deflate bodies decoded;
- one deadline per request covering connect, send and the whole answer;
- plain HTTP and TLS (certificates verified against the system store, SNI sent);
- at most ``connections`` requests in flight; a request cancelled mid-answer closes its connection.

A POST is never sent twice here: a connection that breaks before the answer is complete raises
:class:`HTTPConnectionError` and the caller (the pool) decides about retries. Failures come as
three exceptions the provider classifies: :class:`HTTPConnectError` (could not connect at all),
:class:`HTTPTimeout` (deadline passed) and :class:`HTTPConnectionError` (dropped or broken
mid-request, or an answer that is not valid HTTP).

No proxy support: the compat provider uses aiohttp when a proxy variable applies to the endpoint.
"""

from __future__ import annotations

import asyncio
import collections
import os
import ssl
import urllib.parse
import zlib
from typing import NamedTuple

MAX_HEAD_BYTES = 256 * 1024  # status line and headers
MAX_BODY_BYTES = 256 * 2**20


class HTTPConnectError(Exception):
    """No connection could be made (refused, unreachable, DNS, TLS handshake / certificate)."""


class HTTPTimeout(Exception):
    """The request's deadline passed before the whole answer arrived."""


class HTTPConnectionError(Exception):
    """The connection broke (closed, reset) mid-request, or the answer is not valid HTTP/1.x."""


class Response(NamedTuple):
    status: int
    headers: dict  # lower-case names; repeated headers joined with ", "
    body: bytes


def connect_reason(e: BaseException) -> str:
    """Words for a failed connect: the OS's ("Connection refused", "Name or service not known")
    or the TLS library's."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS certificate: {e.verify_message or e}"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e}"
    if isinstance(e, OSError):
        if e.errno is not None and e.errno > 0:
            return os.strerror(e.errno)
        if e.strerror:
            return str(e.strerror)
    return f"{type(e).__name__}: {e}"


# Parser states of one exchange.
_HEAD, _LENGTH, _CHUNKED, _UNTIL_EOF, _DONE = range(5)


class _Connection(asyncio.Protocol):
    """One keep-alive connection. At most one exchange at a time: ``start`` writes the request
    and returns the future that ``data_received`` resolves with a Response."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future | None = None
        self.buffer = bytearray()
        self.state = _DONE
        self.status = 0
        self.headers: dict = {}
        self.keep_alive = True
        self.remaining = 0  # body bytes still expected (_LENGTH) / in the current chunk (_CHUNKED)
        self.body = bytearray()
        self.received = 0  # bytes of this exchange's answer seen so far

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            # Bytes nobody asked for (an idle connection, or after a timeout): the stream is out of
            # step with our requests, so the connection cannot be used again.
            self.abort()
            return
        self.received += len(data)
        self.buffer += data
        try:
            self._parse()
        except Exception as e:  # HTTPConnectionError, or anything a hostile answer could provoke
            self._fail(e if isinstance(e, HTTPConnectionError) else
                       HTTPConnectionError(f"unreadable answer: {type(e).__name__}: {e}"))
            self.abort()

    def eof_received(self) -> bool:
        self._ended(None)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)

    # ------------------------------------------------------------------ exchange
    def start(self, payload: bytes) -> asyncio.Future:
        self.waiter = waiter = self.loop.create_future()
        self.state, self.received = _HEAD, 0
        self.transport.write(payload)
        return waiter

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def expire(self) -> None:
        """The deadline passed: fail the exchange and drop the connection (the answer may still come)."""
        self._fail(HTTPTimeout())
        self.abort()

    def _fail(self, error: Exception) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.state = _DONE

    def _ended(self, exc: Exception | None) -> None:
        """The server closed the connection (or it broke)."""
        self.closed = True
        if self.waiter is None or self.waiter.done():
            return
        if self.state == _UNTIL_EOF and exc is None:
            self.body += self.buffer
            self.buffer.clear()
            self.keep_alive = False
            self._finish()
            return
        if self.received == 0:
            what = "closed the connection before answering"
        elif self.state == _HEAD:
            what = "closed the connection in the middle of the answer's headers"
        else:
            what = f"closed the connection in the middle of the answer's body ({len(self.body)} bytes read)"
        cause = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        self._fail(HTTPConnectionError(f"the server {what}{cause}"))

    # ------------------------------------------------------------------ parser
    def _parse(self) -> None:
        while True:
            state = self.state
            if state == _HEAD:
                if not self._parse_head():
                    return
            elif state == _LENGTH:
                buffer = self.buffer
                if len(buffer) < self.remaining:
                    self.body += buffer
                    self.remaining -= len(buffer)
                    buffer.clear()
                    return
                self.body += buffer[:self.remaining]
                del buffer[:self.remaining]
                self._finish()
            elif state == _CHUNKED:
                if not self._parse_chunk():
                    return
            elif state == _UNTIL_EOF:
                if len(self.body) + len(self.buffer) > MAX_BODY_BYTES:
                    raise HTTPConnectionError(f"answer body larger than {MAX_BODY_BYTES} bytes")
                self.body += self.buffer
                self.buffer.clear()
                return
            else:  # _DONE with bytes left over: nothing may follow an answer we did not ask for
                if self.buffer:
                    self.keep_alive = False
                    self.close()
                return

    def _parse_head(self) -> bool:
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                raise HTTPConnectionError(f"answer headers longer than {MAX_HEAD_BYTES} bytes")
            return False
        lines = buffer[:end].decode("latin-1").split("\r\n")
        del buffer[:end + 4]
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        valid_code = len(code) == 3 and code.isascii() and code.isdigit() and rest[3:4] in ("", " ")
        if not (version.startswith("HTTP/1.") and valid_code):
            raise HTTPConnectionError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(code)
        headers: dict = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name[0] in " \t" or name[-1] in " \t":
                raise HTTPConnectionError(f"malformed header line in the answer: {line[:80]!r}")
            name, value = name.lower(), value.strip()
            headers[name] = headers[name] + ", " + value if name in headers else value
        if 100 <= status < 200:  # interim answer (100 Continue, 103 Early Hints): the real one follows
            return True
        self.status, self.headers = status, headers
        self.body = bytearray()
        connection = headers.get("connection", "").lower()
        self.keep_alive = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
        coding = headers.get("transfer-encoding")
        if coding is not None:
            if coding.rsplit(",", 1)[-1].strip().lower() != "chunked":
                raise HTTPConnectionError(f"unsupported transfer coding {coding!r}")
            self.state, self.remaining = _CHUNKED, -1
        elif status in (204, 304):
            self._finish()
        elif "content-length" in headers:
            length = headers["content-length"]
            if not (length.isascii() and length.isdigit()):  # also rejects "5, 7" from repeated headers
                raise HTTPConnectionError(f"bad Content-Length {length[:40]!r}")
            self.remaining = int(length)
            if self.remaining > MAX_BODY_BYTES:
                raise HTTPConnectionError(f"answer body of {length} bytes is larger than {MAX_BODY_BYTES}")
            self.state = _LENGTH
        else:
            self.state, self.keep_alive = _UNTIL_EOF, False
        return True

    def _parse_chunk(self) -> bool:
        """One step of chunked decoding; False when more bytes are needed. ``remaining`` is -1
        before a chunk-size line, -2 before the trailer section, else the chunk's data bytes
        still to read plus the 2 of the CRLF after them."""
        buffer = self.buffer
        remaining = self.remaining
        if remaining == -1:
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > 4096:
                    raise HTTPConnectionError("chunk-size line too long")
                return False
            size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
            del buffer[:end + 2]
            if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
                raise HTTPConnectionError(f"bad chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            if len(self.body) + size > MAX_BODY_BYTES:
                raise HTTPConnectionError(f"answer body larger than {MAX_BODY_BYTES} bytes")
            self.remaining = size + 2 if size else -2
            return True
        if remaining == -2:  # trailers: zero or more header lines, then an empty line
            if buffer[:2] == b"\r\n":
                del buffer[:2]
            else:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise HTTPConnectionError("answer trailers too long")
                    return False
                del buffer[:end + 4]
            self._finish()
            return True
        if remaining > 2:  # chunk data
            n = min(remaining - 2, len(buffer))
            if n == 0:
                return False
            self.body += buffer[:n]
            del buffer[:n]
            self.remaining = remaining - n
            return True
        if len(buffer) < 2:  # the CRLF after the data
            return False
        if buffer[:2] != b"\r\n":
            raise HTTPConnectionError("chunk data not followed by CRLF")
        del buffer[:2]
        self.remaining = -1
        return True

    def _finish(self) -> None:
        self.state = _DONE
        waiter = self.waiter
        body = bytes(self.body)
        self.body = bytearray()
        try:
            body = _decode(body, self.headers.get("content-encoding"))
        except HTTPConnectionError as e:
            if not waiter.done():
                waiter.set_exception(e)
            return
        if not waiter.done():
            waiter.set_result(Response(self.status, self.headers, body))


def _decode(body: bytes, coding: str | None) -> bytes:
    """Undo a Content-Encoding (we ask for identity; some servers compress anyway)."""
    if not coding or coding.lower() == "identity":
        return body
    coding = coding.lower().strip()
    try:
        if coding in ("gzip", "x-gzip"):
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if coding == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:  # raw deflate without the zlib wrapper, as some servers send
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except zlib.error as e:
        raise HTTPConnectionError(f"answer body is not valid {coding}: {e}") from None
    raise HTTPConnectionError(f"unsupported content encoding {coding!r}")


class HTTPClient:
    """Keep-alive HTTP/1.1 connections to one origin (scheme, host, port) and POSTs over them.

    base_url: "http://host:port/prefix" or "https://..."; request paths are appended to it
    headers: sent with every request (e.g. Authorization); names and values must be one line
    connections: at most this many requests in flight (and open connections)
    keepalive_s: idle connections older than this are closed rather than reused
    ssl_context: for https (default: ``ssl.create_default_context()``, verified, system CAs)
    """

    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None, connections: int = 64,
                 keepalive_s: float = 15.0, ssl_context: ssl.SSLContext | None = None):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base URL is not an http(s) URL with a host")
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        self._ssl = (ssl_context or ssl.create_default_context()) if self.tls else None
        self._prefix = parts.path.rstrip("/")
        self._query = parts.query
        host_header = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port is not None and parts.port != (443 if self.tls else 80):
            host_header += f":{parts.port}"
        lines = [("Host", host_header), ("User-Agent", "bezoar"), ("Accept", "application/json"),
                 ("Accept-Encoding", "identity"), ("Content-Type", "application/json")]
        lines += list((headers or {}).items())
        for name, value in lines:
            if not name or any(c in name for c in ":\r\n \t") or any(c in value for c in "\r\n\0"):
                raise ValueError(f"header {name!r} is not a single line")
        self._common = "".join(f"{name}: {value}\r\n" for name, value in lines).encode("latin-1")
        self._heads: dict[str, bytes] = {}
        self._idle: collections.deque[_Connection] = collections.deque()
        self._all: set[_Connection] = set()
        self._slots = asyncio.Semaphore(connections)
        self._keepalive_s = keepalive_s
        self._closed = False

    def __repr__(self) -> str:  # no headers: they hold the API key
        return f"HTTPClient({'https' if self.tls else 'http'}://{self.host}:{self.port}{self._prefix})"

    @property
    def open_connections(self) -> int:
        return sum(not c.closed for c in self._all)

    def _head(self, path: str) -> bytes:
        head = self._heads.get(path)
        if head is None:
            target = self._prefix + path + ("?" + self._query if self._query else "")
            head = self._heads[path] = b"POST " + target.encode("ascii") + b" HTTP/1.1\r\n" + self._common \
                + b"Content-Length: "
        return head

    async def post(self, path: str, body: bytes, timeout: float) -> Response:
        """POST ``body`` to base path + ``path``; the Response, whatever its status. Raises
        HTTPConnectError, HTTPTimeout or HTTPConnectionError (see the module doc)."""
        if self._closed:
            raise HTTPConnectionError("the client is closed")
        payload = b"".join((self._head(path), str(len(body)).encode(), b"\r\n\r\n", body))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._slots:
            conn = self._take_idle(loop.time())
            if conn is None:
                conn = await self._connect(loop, deadline)
            waiter = conn.start(payload)
            timer = loop.call_at(deadline, conn.expire)
            try:
                response = await waiter
            except BaseException:  # failed, timed out or cancelled: the connection's state is unknown
                conn.abort()
                self._all.discard(conn)
                raise
            finally:
                timer.cancel()
            if conn.keep_alive and not conn.closed and not self._closed:
                conn.waiter = None
                conn.idle_since = loop.time()
                self._idle.append(conn)
            else:
                conn.close()
                self._all.discard(conn)
            return response

    def _take_idle(self, now: float) -> _Connection | None:
        idle = self._idle
        stale_before = now - self._keepalive_s
        while idle and (idle[0].closed or idle[0].idle_since < stale_before):  # the oldest first
            conn = idle.popleft()
            conn.close()
            self._all.discard(conn)
        while idle:
            conn = idle.pop()  # most recently used: the least likely to have been closed
            if not conn.closed:
                return conn
            self._all.discard(conn)
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        conn = _Connection(loop)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: conn, self.host, self.port, ssl=self._ssl,
                                       server_hostname=self.host if self.tls else None),
                max(deadline - loop.time(), 0.0))
        except (asyncio.TimeoutError, TimeoutError):  # no connection at all: a host that drops the packets
            raise HTTPConnectError("timed out while connecting") from None
        except (OSError, UnicodeError) as e:
            raise HTTPConnectError(connect_reason(e)) from None
        self._all.add(conn)
        return conn

    async def close(self) -> None:
        """Close every connection (those in use too: their requests fail)."""
        self._closed = True
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks
