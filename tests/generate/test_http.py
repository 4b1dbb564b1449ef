"""The lean HTTP/1.1 client (bezoar.generate.http): framing, partial reads, keep-alive, faults, TLS.

Two levels: the parser fed by hand (every way an answer can be split into reads), and the client
against a scripted raw-socket server in the test's own event loop (connections counted, answers
written piece by piece, connections reset or closed on cue).
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import subprocess
import zlib

import pytest

from bezoar.generate.http import (
    HTTPClient, HTTPConnectError, HTTPConnectionError, HTTPTimeout, Response, _Connection,
)
from tests.generate.conftest import closed_port_url

JSON = b'{"choices": [{"message": {"content": "hi"}}]}'


def length_answer(body: bytes = JSON, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: application/json\r\n" + extra + \
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


def chunked_answer(pieces: list[bytes], trailers: bytes = b"") -> bytes:
    out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for i, piece in enumerate(pieces):
        ext = b";name=value" if i == 0 else b""
        out += format(len(piece), "x").encode() + ext + b"\r\n" + piece + b"\r\n"
    return out + b"0\r\n" + trailers + b"\r\n"


# ---------------------------------------------------------------------- parser, fed by hand
class FakeTransport:
    def __init__(self):
        self.written, self.closed, self.aborted = [], False, False

    def write(self, data):
        self.written.append(data)

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = self.closed = True


def feed(pieces: list[bytes], eof: bool = False):
    """Run one exchange on a _Connection over a fake transport; return (connection, future)."""
    async def go():
        conn = _Connection(asyncio.get_running_loop())
        conn.connection_made(FakeTransport())
        waiter = conn.start(b"POST / HTTP/1.1\r\n\r\n")
        for piece in pieces:
            conn.data_received(piece)
        if eof:
            conn.eof_received()
        await asyncio.sleep(0)
        return conn, waiter

    return asyncio.run(go())


def splits(data: bytes):
    """``data`` whole, byte by byte, and cut in two at every position."""
    yield [data]
    yield [data[i:i + 1] for i in range(len(data))]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]


ANSWERS = {
    "length": (length_answer(), JSON, True),
    "empty-length": (length_answer(b""), b"", True),
    "chunked": (chunked_answer([b'{"choices": ', b'[{"message": {"content": "hi"}}]}']), JSON, True),
    "chunked-trailers": (chunked_answer([JSON], trailers=b"X-Checksum: 1\r\nX-Other: 2\r\n"), JSON, True),
    "interim-100": (b"HTTP/1.1 100 Continue\r\n\r\n" + length_answer(), JSON, True),
    "connection-close": (length_answer(extra=b"Connection: close\r\n"), JSON, False),
    "http10": (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
    "no-content": (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
}


@pytest.mark.parametrize("name", list(ANSWERS))
def test_parser_any_split(name):
    data, body, keep_alive = ANSWERS[name]
    for pieces in splits(data):
        conn, waiter = feed(pieces)
        assert waiter.done() and waiter.exception() is None, (name, pieces)
        response = waiter.result()
        assert response.body == body and response.status in (200, 204), (name, pieces)
        assert conn.keep_alive is keep_alive and not conn.buffer


def test_parser_headers_lowercase_and_repeated_joined():
    conn, waiter = feed([b"HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 0\r\n\r\n"])
    response = waiter.result()
    assert response.status == 429 and response.headers["retry-after"] == "3" and response.headers["x-a"] == "1, 2"


def test_parser_body_until_eof():
    data = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + JSON
    for pieces in splits(data):
        conn, waiter = feed(pieces, eof=True)
        assert waiter.result().body == JSON and not conn.keep_alive
    conn, waiter = feed([data])  # no EOF yet: not finished
    assert not waiter.done()


def test_parser_decodes_gzip_and_deflate():
    for coding, packed in (("gzip", gzip.compress(JSON)), ("deflate", zlib.compress(JSON)),
                           ("deflate", zlib.compress(JSON)[2:-4])):  # raw deflate as well
        conn, waiter = feed([length_answer(packed, extra=f"Content-Encoding: {coding}\r\n".encode())])
        assert waiter.result().body == JSON, coding
    conn, waiter = feed([length_answer(b"not gzip", extra=b"Content-Encoding: gzip\r\n")])
    assert isinstance(waiter.exception(), HTTPConnectionError)
    conn, waiter = feed([length_answer(b"x", extra=b"Content-Encoding: br\r\n")])
    assert "unsupported content encoding" in str(waiter.exception())


@pytest.mark.parametrize("data,words", [
    (b"SMTP ready\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 2x0 OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported transfer coding"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n", "not followed by CRLF"),
])
def test_parser_rejects_malformed_answers(data, words):
    conn, waiter = feed([data])
    assert isinstance(waiter.exception(), HTTPConnectionError) and words in str(waiter.exception())
    assert conn.transport.aborted


def test_parser_rejects_endless_headers():
    conn, waiter = feed([b"HTTP/1.1 200 OK\r\n"] + [b"X-Pad: " + b"a" * 1000 + b"\r\n"] * 300)
    assert "headers longer than" in str(waiter.exception())


@pytest.mark.parametrize("pieces,words", [
    ([], "before answering"),
    ([b"HTTP/1.1 200 OK\r\nContent-Le"], "middle of the answer's headers"),
    ([length_answer()[:-10]], "middle of the answer's body"),
    ([chunked_answer([JSON])[:-5]], "middle of the answer's body"),
])
def test_parser_eof_before_the_end_is_an_error(pieces, words):
    conn, waiter = feed(pieces, eof=True)
    assert isinstance(waiter.exception(), HTTPConnectionError) and words in str(waiter.exception())
    assert conn.closed


def test_parser_bytes_after_the_answer_stop_reuse():
    conn, waiter = feed([length_answer() + b"HTTP/1.1 200 OK\r\n"])
    assert waiter.result().body == JSON and not conn.keep_alive


# ---------------------------------------------------------------------- client against a raw server
class RawServer:
    """Scripted HTTP server on localhost, in the test's event loop. Each request read gets the next
    reply from ``replies``: a list of steps, each bytes (written), a float (seconds to pause),
    "close" (FIN), "reset" (RST) or "hang". With no reply left the connection is closed."""

    def __init__(self, replies=(), ssl_context=None):
        self.replies = list(replies)
        self.ssl_context = ssl_context
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.closed_by_client = 0

    async def __aenter__(self) -> "RawServer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        scheme = "https" if self.ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/v1"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for task in [t for t in asyncio.all_tasks() if t.get_name().startswith("raw-conn")]:
            task.cancel()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asyncio.current_task().set_name(f"raw-conn-{self.connections}")
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_client += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                if not self.replies:
                    writer.close()
                    return
                for step in self.replies.pop(0):
                    if isinstance(step, bytes):
                        writer.write(step)
                        await writer.drain()
                    elif isinstance(step, float):
                        await asyncio.sleep(step)
                    elif step == "close":
                        writer.close()
                        return
                    elif step == "reset":
                        writer.transport.abort()
                        return
                    elif step == "hang":
                        await asyncio.sleep(3600)
        except (ConnectionError, asyncio.CancelledError):
            writer.transport.abort()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def until(condition, what: str, within_s: float = 20.0) -> None:
    """Wait (in the test's event loop) until ``condition()`` holds; fail naming ``what`` if it never does.
    What the client does when bytes or a FIN arrive takes some turns of the loop after the server acted:
    a fixed sleep was not always enough on a loaded machine (a stalled process wakes with the sleep's
    timer and the socket's event due together, and the timer can run first)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not condition():
        assert loop.time() < deadline, f"{what}: not within {within_s:g} s"
        await asyncio.sleep(0.005)


def test_client_round_trip_request_format():
    async def go():
        async with RawServer([[length_answer()]]) as server:
            client = HTTPClient(server.url + "?api-version=1", headers={"Authorization": "Bearer sk-x"})
            response = await client.post("/chat/completions", b'{"a": 1}', timeout=5)
            await client.close()
            return server, response

    server, response = run(go())
    assert response == Response(200, {"content-type": "application/json", "content-length": str(len(JSON))}, JSON)
    head, body = server.requests[0]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions?api-version=1 HTTP/1.1" and body == b'{"a": 1}'
    assert f"Host: 127.0.0.1:{server.port}" in lines and "Authorization: Bearer sk-x" in lines
    assert "Content-Length: 8" in lines and "Content-Type: application/json" in lines


def test_client_keep_alive_reuses_one_connection():
    async def go():
        async with RawServer([[length_answer()], [chunked_answer([b"a", b"b"])], [length_answer(b"x")]]) as server:
            client = HTTPClient(server.url)
            bodies = [(await client.post("/c", b"{}", timeout=5)).body for _ in range(3)]
            await client.close()
            return server, bodies

    server, bodies = run(go())
    assert bodies == [JSON, b"ab", b"x"] and server.connections == 1 and len(server.requests) == 3


def test_client_answer_written_in_pieces():
    answer = chunked_answer([b'{"choices": ', b"[]}"])
    steps = [answer[i:i + 7] for i in range(0, len(answer), 7)]
    steps = [x for piece in steps for x in (piece, 0.002)]

    async def go():
        async with RawServer([steps, [length_answer()]]) as server:
            client = HTTPClient(server.url)
            first = await client.post("/c", b"{}", timeout=5)
            second = await client.post("/c", b"{}", timeout=5)
            await client.close()
            return server, first, second

    server, first, second = run(go())
    assert first.body == b'{"choices": []}' and second.body == JSON and server.connections == 1


def test_client_connection_close_header_and_http10_are_not_reused():
    async def go():
        replies = [[length_answer(extra=b"Connection: close\r\n"), "close"],
                   [b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "close"], [length_answer()]]
        async with RawServer(replies) as server:
            client = HTTPClient(server.url)
            bodies = [(await client.post("/c", b"{}", timeout=5)).body for _ in range(3)]
            await client.close()
            return server, bodies

    server, bodies = run(go())
    assert bodies == [JSON, b"ok", JSON] and server.connections == 3


def test_client_server_closing_idle_connections():
    """The server closes a kept-alive connection while it is idle (its keep-alive timeout): the
    next request goes out on a new connection and succeeds."""
    async def go():
        async with RawServer([[length_answer(), 0.05, "close"], [length_answer(b"2")]]) as server:
            client = HTTPClient(server.url)
            first = await client.post("/c", b"{}", timeout=5)
            await until(lambda: client.open_connections == 0, "the idle connection the server closed is dropped")
            second = await client.post("/c", b"{}", timeout=5)
            await client.close()
            return server, first, second

    server, first, second = run(go())
    assert first.body == JSON and second.body == b"2" and server.connections == 2


def test_client_closes_connections_idle_longer_than_keepalive():
    async def go():
        async with RawServer([[length_answer()], [length_answer()]]) as server:
            client = HTTPClient(server.url, keepalive_s=0.05)
            await client.post("/c", b"{}", timeout=5)
            await asyncio.sleep(0.15)
            await client.post("/c", b"{}", timeout=5)
            await until(lambda: server.closed_by_client >= 1, "the connection idle past keepalive_s is closed")
            await client.close()
            return server

    server = run(go())
    assert server.connections == 2 and server.closed_by_client >= 1


@pytest.mark.parametrize("steps,words", [
    (["reset"], "before answering"),
    (["close"], "before answering"),
    ([length_answer()[:40], 0.01, "reset"], "middle of the answer's headers"),
    ([length_answer()[:-5], 0.01, "reset"], "middle of the answer's body"),
    ([chunked_answer([JSON])[:-8], 0.01, "close"], "middle of the answer's body"),
    ([b"garbage\r\n\r\n"], "not an HTTP/1.x status line"),
])
def test_client_broken_connections(steps, words):
    async def go():
        async with RawServer([steps, [length_answer()]]) as server:
            client = HTTPClient(server.url)
            with pytest.raises(HTTPConnectionError, match=words):
                await client.post("/c", b"{}", timeout=5)
            after = await client.post("/c", b"{}", timeout=5)  # a fresh connection works
            await client.close()
            return server, after

    server, after = run(go())
    assert after.body == JSON and server.connections == 2


def test_client_reset_on_a_reused_connection_is_not_resent():
    async def go():
        async with RawServer([[length_answer()], ["reset"], [length_answer()]]) as server:
            client = HTTPClient(server.url)
            await client.post("/c", b"{}", timeout=5)
            with pytest.raises(HTTPConnectionError):
                await client.post("/c", b"{}", timeout=5)
            await client.close()
            return server

    assert len(run(go()).requests) == 2  # the POST went out once; the pool decides about retries


def test_client_timeout_then_recovers():
    async def go():
        async with RawServer([["hang"], [length_answer()]]) as server:
            client = HTTPClient(server.url)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(HTTPTimeout):
                await client.post("/c", b"{}", timeout=0.2)
            waited = loop.time() - t0
            after = await client.post("/c", b"{}", timeout=5)
            await client.close()
            return server, waited, after

    server, waited, after = run(go())
    # Ended by the 0.2 s timeout, not the server (it would hang for an hour); the upper bound only has to
    # tell those apart, with room for a loaded machine's stalls.
    assert 0.15 < waited < 20 and after.body == JSON and server.connections == 2


def test_client_late_answer_after_timeout_is_not_taken_for_the_next():
    async def go():
        async with RawServer([[0.3, length_answer(b"late")], [length_answer(b"fresh")]]) as server:
            client = HTTPClient(server.url)
            with pytest.raises(HTTPTimeout):
                await client.post("/c", b"{}", timeout=0.1)
            await asyncio.sleep(0.3)
            after = await client.post("/c", b"{}", timeout=5)
            await client.close()
            return after

    assert run(go()).body == b"fresh"


def test_client_cancelled_request_drops_its_connection():
    async def go():
        # The first answer never comes (the request is cancelled while waiting for it): a pause of 0.2 s here
        # let a loaded machine's stall deliver the answer before the cancel, or cancel before the connection
        # was made.
        async with RawServer([["hang"], [length_answer(b"fresh")]]) as server:
            client = HTTPClient(server.url)
            task = asyncio.ensure_future(client.post("/c", b"{}", timeout=5))
            await until(lambda: server.requests, "the request reaches the server")  # its answer is now awaited
            (conn,) = client._all
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert conn.transport.is_closing()  # at once, not when (if ever) an answer comes
            after = await client.post("/c", b"{}", timeout=5)
            await client.close()
            return server, after

    server, after = run(go())
    assert after.body == b"fresh" and server.connections == 2


def test_client_unsolicited_bytes_on_an_idle_connection():
    """Some servers write a 408 on an idle connection before closing it: never read as an answer."""
    async def go():
        async with RawServer([[length_answer(), 0.02, b"HTTP/1.1 408 Request Timeout\r\n\r\n"],
                              [length_answer(b"next")]]) as server:
            client = HTTPClient(server.url)
            await client.post("/c", b"{}", timeout=5)
            await until(lambda: client.open_connections == 0, "the idle connection that got a 408 is dropped")
            after = await client.post("/c", b"{}", timeout=5)
            await client.close()
            return server, after

    server, after = run(go())
    assert after.status == 200 and after.body == b"next" and server.connections == 2


def test_client_limits_connections():
    async def go():
        async with RawServer([[0.02, length_answer()]] * 6) as server:
            client = HTTPClient(server.url, connections=2)
            answers = await asyncio.gather(*(client.post("/c", b"{}", timeout=5) for _ in range(6)))
            await client.close()
            return server, answers

    server, answers = run(go())
    assert all(a.body == JSON for a in answers) and server.connections == 2


def test_client_connection_refused():
    async def go():
        client = HTTPClient(closed_port_url())
        try:
            await client.post("/c", b"{}", timeout=5)
        finally:
            await client.close()

    with pytest.raises(HTTPConnectError, match="Connection refused"):
        run(go())


def test_client_rejects_header_injection_and_bad_urls():
    with pytest.raises(ValueError, match="Authorization"):
        HTTPClient("http://h/v1", headers={"Authorization": "Bearer a\r\nX-Evil: 1"})
    with pytest.raises(ValueError, match="http"):
        HTTPClient("ftp://h/v1")
    assert "Bearer" not in repr(HTTPClient("http://h/v1", headers={"Authorization": "Bearer sk-secret"}))


# ---------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (openssl command line)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    done = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                           "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                           "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate: {done.stderr[-300:]}")
    return cert, key


def test_client_tls(certificate):
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def go():
        async with RawServer([[length_answer()], [chunked_answer([b"tl", b"s"])]], server_context) as server:
            trusting = HTTPClient(server.url, ssl_context=ssl.create_default_context(cafile=str(cert)))
            bodies = [(await trusting.post("/c", b"{}", timeout=5)).body for _ in range(2)]
            await trusting.close()
            default = HTTPClient(server.url)  # the system store does not know our certificate
            with pytest.raises(HTTPConnectError, match="certificate"):
                await default.post("/c", b"{}", timeout=5)
            await default.close()
            return server, bodies

    server, bodies = run(go())
    assert bodies == [JSON, b"tls"] and len(server.requests) == 2
