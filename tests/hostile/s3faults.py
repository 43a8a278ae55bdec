"""An HTTP proxy in front of moto that throttles and cuts requests, the way a busy S3 does.

Each distinct request (method, path, query, Range) is picked for a fault or not by a seeded
hash, so which requests fail does not depend on thread timing: a picked request is answered
``503 SlowDown`` on its first ``fail_attempts`` attempts, or its connection is cut in the middle
of the request body (uploads) or of the response body (downloads); later attempts pass. With
``fail_attempts`` below ``storage.max_attempts`` every request succeeds in the end; at or above
it, requests fail for good. ``stats`` counts what was done.

Every request gets its own upstream connection and the client connection is closed after each
answer (``Connection: close``), so there is no keep-alive state to get wrong.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections import Counter

SLOWDOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
            b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>")


def _read_until(sock: socket.socket, buf: bytearray, marker: bytes) -> int:
    while (end := buf.find(marker)) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return end


def _read_exact(sock: socket.socket, buf: bytearray, n: int) -> None:
    while len(buf) < n:
        chunk = sock.recv(min(65536, n - len(buf)))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk


def _read_chunked(sock: socket.socket, buf: bytearray, start: int) -> int:
    """Read a chunked body (aws-chunked uploads, trailers included) into ``buf``; returns its end."""
    pos = start
    while True:
        line_end = _read_until_from(sock, buf, b"\r\n", pos)
        size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
        pos = line_end + 2
        if size == 0:
            _read_exact(sock, buf, pos + 2)
            if buf[pos:pos + 2] == b"\r\n":
                return pos + 2
            return _read_until_from(sock, buf, b"\r\n\r\n", pos) + 4  # trailers
        _read_exact(sock, buf, pos + size + 2)
        pos += size + 2


def _read_until_from(sock: socket.socket, buf: bytearray, marker: bytes, start: int) -> int:
    while (end := buf.find(marker, start)) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return end


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}


def _with_header(head: bytes, name: str, value: str) -> bytes:
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(name.lower().encode() + b":")]
    return b"\r\n".join(lines + [f"{name}: {value}".encode()])


class FaultyS3:
    def __init__(self, target_port: int, *, seed: int = 0, fraction: float = 0.3, fail_attempts: int = 1,
                 kinds: tuple[str, ...] = ("slowdown", "cut")):
        self.target, self.seed, self.fraction, self.fail_attempts, self.kinds = (
            ("127.0.0.1", target_port), seed, fraction, fail_attempts, kinds)
        self.attempts: Counter = Counter()
        self.stats: Counter = Counter()
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.close()

    def _fault(self, key: str) -> str | None:
        digest = hashlib.sha256(f"{self.seed}|{key}".encode()).digest()
        with self.lock:
            self.attempts[key] += 1
            attempt = self.attempts[key]
        if int.from_bytes(digest[:4], "big") / 2**32 >= self.fraction or attempt > self.fail_attempts:
            return None
        return self.kinds[digest[4] % len(self.kinds)]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            self._one_request(client)
        except (ConnectionError, OSError):
            pass
        finally:
            client.close()

    def _one_request(self, client: socket.socket) -> None:
        buf = bytearray()
        end = _read_until(client, buf, b"\r\n\r\n")
        head, headers = bytes(buf[:end]), _headers(bytes(buf[:end]))
        method, target = head.split(b" ", 2)[:2]
        length = int(headers.get("content-length", 0))
        if headers.get("expect", "").lower() == "100-continue":
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            head = _with_header(head, "Expect", "").replace(b"\r\nExpect: ", b"")
        fault = self._fault(f"{method.decode()} {target.decode()} {headers.get('range', '')}")
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        body = bytearray(buf[end + 4:])
        if fault == "cut" and (length or chunked):  # the upload breaks off half way
            _read_exact(client, body, max(length // 2, 1))
            self._count("cut_upload")
            return
        if chunked:
            length = _read_chunked(client, body, 0)
        else:
            _read_exact(client, body, length)
        if fault == "slowdown" or (fault == "cut" and method == b"HEAD"):
            self._count("slowdown")
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                           + f"Content-Length: {len(SLOWDOWN)}\r\n\r\n".encode() + SLOWDOWN)
            return
        response = self._forward(_with_header(head, "Connection", "close") + b"\r\n\r\n" + bytes(body[:length]))
        split = response.find(b"\r\n\r\n")
        out_head, out_body = response[:split], response[split + 4:]
        out = _with_header(out_head, "Connection", "close") + b"\r\n\r\n"
        if fault == "cut" and len(out_body) > 1:  # the download breaks off half way
            self._count("cut_download")
            client.sendall(out + out_body[: len(out_body) // 2])
            return
        self._count("passed")
        client.sendall(out + out_body)

    def _forward(self, request: bytes) -> bytes:
        with socket.create_connection(self.target) as upstream:
            upstream.sendall(request)
            chunks = []
            while chunk := upstream.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def _count(self, what: str) -> None:
        with self.lock:
            self.stats[what] += 1
