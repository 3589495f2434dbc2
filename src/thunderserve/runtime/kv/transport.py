"""Framed messages between runtime processes over TCP (asyncio streams): KV caches and control traffic.

Frame layout (big-endian):
    magic  b"TSF1"                      4 bytes
    header_len   u32                    4 bytes   (JSON header, UTF-8)
    payload_len  u64                    8 bytes   (opaque bytes, e.g. `quantize.to_bytes(...)`)
    crc32        u32                    4 bytes   zlib.crc32 over header_len, payload_len, header and payload
    header, payload
The checksum is verified on receipt; a mismatch raises `FrameCorruptError` (the stream is then unusable and
is closed). Every read and write is bounded by a timeout (`TransportTimeoutError`); a peer that goes away
mid-frame or before answering raises `PeerClosedError`. All three derive from `TransportError`.

Authentication (a deployment's worker ports are reachable by anything on the network they bind to): with a
shared secret, the accepting side first sends `{"type": "challenge", "nonce"}` and honours nothing until the
connecting side answers `{"type": "auth", "mac": HMAC-SHA256(secret, purpose:nonce)}` (`server_handshake`,
`client_handshake`); a wrong or missing answer, or none within the timeout, closes the connection. Before
that, a frame may carry at most `AUTH_MAX_HEADER_BYTES` and no payload; after it, the limits the connection
was given (`max_header_bytes`, `max_payload_bytes`: a worker caps KV payloads at what its model can need).

`KvSender.send_kv` ships one request's KV cache and waits for the receiver's acknowledgement, so a sender
knows the decode side holds the cache before it reports the hand-off. `KvReceiver` runs the other end and
hands each cache to a callback whose outcome is sent back as the acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

MAGIC = b"TSF1"
_PREFIX = struct.Struct(">4sIQI")  # magic, header_len, payload_len, crc32
_LENGTHS = struct.Struct(">IQ")
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_PAYLOAD_BYTES = 64 * 1024**3
DEFAULT_TIMEOUT_S = 30.0
AUTH_MAX_HEADER_BYTES = 4096  # challenge/answer frames, and anything read before authentication
AUTH_TIMEOUT_S = 10.0  # an unauthenticated connection that does not answer in time is closed


class TransportError(Exception):
    """A frame could not be delivered or read (runtime fault, not a user error)."""


class PeerClosedError(TransportError):
    """The other side closed the connection or died (mid-frame or before answering)."""


class FrameCorruptError(TransportError):
    """A received frame failed its checksum or had impossible lengths."""


class TransportTimeoutError(TransportError, TimeoutError):
    """A read, write or connect did not finish within its timeout."""


class AuthError(TransportError):
    """The other side did not prove it holds the deployment's secret."""


@dataclass(frozen=True)
class Frame:
    header: dict[str, Any]  # small JSON object (message type, request id, metadata)
    payload: bytes = b""  # opaque body (KV bytes); empty for control messages


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """Serialise one frame (prefix + header + payload)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError(f"frame header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    lengths = _LENGTHS.pack(len(head), len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head, zlib.crc32(lengths)))
    return _PREFIX.pack(MAGIC, len(head), len(payload), crc) + head + payload


async def _timed(aw: Awaitable[Any], timeout_s: float | None, what: str) -> Any:
    try:
        async with asyncio.timeout(timeout_s):
            return await aw
    except TimeoutError:
        raise TransportTimeoutError(f"{what} timed out after {timeout_s:g} s") from None


async def write_frame(writer: asyncio.StreamWriter, header: dict[str, Any], payload: bytes = b"",
                      timeout_s: float | None = DEFAULT_TIMEOUT_S) -> int:
    """Send one frame and wait until it is flushed to the socket; returns the bytes written."""
    data = encode_frame(header, payload)
    if writer.is_closing():
        raise PeerClosedError("connection is closed")
    try:
        writer.write(data)
        await _timed(writer.drain(), timeout_s, "frame write")
    except TransportError:
        raise
    except (ConnectionError, OSError) as exc:
        raise PeerClosedError(f"peer closed the connection while sending: {exc}") from None
    return len(data)


async def read_frame(reader: asyncio.StreamReader, timeout_s: float | None = DEFAULT_TIMEOUT_S,
                     idle_timeout_s: float | None = None, max_header_bytes: int = MAX_HEADER_BYTES,
                     max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> Frame:
    """Read one frame and verify it.

    `idle_timeout_s` bounds the wait for a frame to start (None: wait for ever, e.g. an idle control
    link); `timeout_s` bounds reading the rest once it has started. A frame announcing more than
    `max_header_bytes` / `max_payload_bytes` is refused before any of it is read (`FrameCorruptError`).
    """
    try:
        prefix = await _timed(reader.readexactly(_PREFIX.size), idle_timeout_s, "waiting for a frame")
    except TransportError:
        raise
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise PeerClosedError("peer closed the connection") from None
        raise PeerClosedError("peer closed the connection mid-frame") from None
    except (ConnectionError, OSError) as exc:
        raise PeerClosedError(f"connection lost: {exc}") from None
    magic, head_len, payload_len, crc = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameCorruptError(f"bad frame magic {magic!r}")
    if head_len > min(max_header_bytes, MAX_HEADER_BYTES) or payload_len > min(max_payload_bytes, MAX_PAYLOAD_BYTES):
        raise FrameCorruptError(f"impossible frame lengths for this connection (header {head_len}, "
                                f"payload {payload_len})")
    try:
        body = await _timed(reader.readexactly(head_len + payload_len), timeout_s, "frame read")
    except TransportError:
        raise
    except asyncio.IncompleteReadError:
        raise PeerClosedError("peer closed the connection mid-frame") from None
    except (ConnectionError, OSError) as exc:
        raise PeerClosedError(f"connection lost mid-frame: {exc}") from None
    lengths = _LENGTHS.pack(head_len, payload_len)
    if zlib.crc32(body, zlib.crc32(lengths)) != crc:
        raise FrameCorruptError(f"frame checksum mismatch ({head_len + payload_len} bytes)")
    try:
        header = json.loads(body[:head_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameCorruptError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameCorruptError("frame header is not a JSON object")
    return Frame(header, bytes(body[head_len:]))


class FrameConnection:
    """One TCP connection carrying frames both ways; writes are serialised by a lock."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout_s: float | None = DEFAULT_TIMEOUT_S) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout_s = timeout_s
        self._write_lock = asyncio.Lock()
        self.max_header_bytes = MAX_HEADER_BYTES  # what `recv` accepts; lowered for untrusted peers
        self.max_payload_bytes = MAX_PAYLOAD_BYTES

    @classmethod
    async def connect(cls, host: str, port: int, timeout_s: float | None = DEFAULT_TIMEOUT_S
                      ) -> FrameConnection:
        try:
            reader, writer = await _timed(asyncio.open_connection(host, port), timeout_s,
                                          f"connect to {host}:{port}")
        except TransportError:
            raise
        except OSError as exc:
            raise PeerClosedError(f"cannot connect to {host}:{port}: {exc}") from None
        return cls(reader, writer, timeout_s)

    @property
    def peer(self) -> str:
        info = self.writer.get_extra_info("peername")
        return f"{info[0]}:{info[1]}" if info else "?"

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    async def send(self, header: dict[str, Any], payload: bytes = b"") -> int:
        async with self._write_lock:
            return await write_frame(self.writer, header, payload, self.timeout_s)

    async def recv(self, idle_timeout_s: float | None = None) -> Frame:
        return await read_frame(self.reader, self.timeout_s, idle_timeout_s, self.max_header_bytes,
                                self.max_payload_bytes)

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


ConnectionHandler = Callable[[FrameConnection], Awaitable[None]]
MAX_KV_HEADER_BYTES = 1024 * 1024  # a KV frame's header: request id and cache metadata


def new_secret() -> str:
    """A fresh per-deployment secret (256 bits, hex)."""
    return secrets.token_hex(32)


def _mac(secret: str, purpose: str, nonce: str) -> str:
    return hmac.new(secret.encode(), f"{purpose}:{nonce}".encode(), hashlib.sha256).hexdigest()


async def server_handshake(conn: FrameConnection, secret: str, purpose: str,
                           timeout_s: float = AUTH_TIMEOUT_S) -> None:
    """Accepting side: challenge the peer; AuthError (connection to be closed) unless it proves the secret."""
    conn.max_header_bytes, conn.max_payload_bytes = AUTH_MAX_HEADER_BYTES, 0
    nonce = secrets.token_hex(16)
    await conn.send({"type": "challenge", "purpose": purpose, "nonce": nonce})
    try:
        frame = await conn.recv(idle_timeout_s=timeout_s)
    except FrameCorruptError as exc:
        raise AuthError(f"bad answer to the challenge from {conn.peer}: {exc}") from None
    mac = frame.header.get("mac")
    if frame.header.get("type") != "auth" or not isinstance(mac, str) or \
            not hmac.compare_digest(mac, _mac(secret, purpose, nonce)):
        raise AuthError(f"peer {conn.peer} failed authentication")


async def client_handshake(conn: FrameConnection, secret: str, purpose: str,
                           timeout_s: float | None = AUTH_TIMEOUT_S) -> None:
    """Connecting side: answer the server's challenge with the secret's MAC."""
    limits = conn.max_header_bytes, conn.max_payload_bytes
    conn.max_header_bytes, conn.max_payload_bytes = AUTH_MAX_HEADER_BYTES, 0
    frame = await conn.recv(idle_timeout_s=timeout_s)
    h = frame.header
    if h.get("type") != "challenge" or h.get("purpose") != purpose or not isinstance(h.get("nonce"), str):
        raise AuthError(f"{conn.peer} did not send a {purpose} challenge")
    await conn.send({"type": "auth", "mac": _mac(secret, purpose, h["nonce"])})
    conn.max_header_bytes, conn.max_payload_bytes = limits


class FrameServer:
    """A TCP server handing each accepted connection to `handler` (errors end that connection only)."""

    def __init__(self, handler: ConnectionHandler, timeout_s: float | None = DEFAULT_TIMEOUT_S, *,
                 secret: str | None = None, purpose: str = "frames", max_header_bytes: int = MAX_HEADER_BYTES,
                 max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        self._handler = handler
        self._timeout_s = timeout_s
        self._secret = secret  # None: no handshake (in-process tests); launched deployments always set one
        self._purpose = purpose
        self._limits = (max_header_bytes, max_payload_bytes)
        self._server: asyncio.Server | None = None
        self._conns: set[FrameConnection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._on_client, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = FrameConnection(reader, writer, self._timeout_s)
        self._conns.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._secret is not None:
                await server_handshake(conn, self._secret, self._purpose)
            conn.max_header_bytes, conn.max_payload_bytes = self._limits
            await self._handler(conn)
        except (TransportError, asyncio.CancelledError):
            pass  # peer gone, bad frame, failed handshake or server closing: this connection ends, the server goes on
        finally:
            self._conns.discard(conn)
            if task is not None:
                self._tasks.discard(task)
            await conn.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self._conns):
                await conn.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=2.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None


@dataclass(frozen=True)
class KvAck:
    ok: bool
    error: str = ""  # why the receiver refused the cache (e.g. it is not decoding any more)


KvCallback = Callable[[dict[str, Any], bytes], Awaitable[None]]


class KvReceiver:
    """Accepts KV frames `{"type": "kv", "request_id", "meta"}` and acknowledges each one.

    The callback gets (header, payload); returning normally acks ok, raising acks with the error text.
    """

    def __init__(self, on_kv: KvCallback, timeout_s: float | None = DEFAULT_TIMEOUT_S, *,
                 secret: str | None = None, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        self._on_kv = on_kv
        self._server = FrameServer(self._serve, timeout_s, secret=secret, purpose="kv",
                                   max_header_bytes=MAX_KV_HEADER_BYTES, max_payload_bytes=max_payload_bytes)

    @property
    def port(self) -> int:
        return self._server.port

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        return await self._server.start(host, port)

    async def close(self) -> None:
        await self._server.close()

    async def _serve(self, conn: FrameConnection) -> None:
        while True:
            try:
                frame = await conn.recv()
            except PeerClosedError:
                return
            rid = frame.header.get("request_id")
            try:
                await self._on_kv(frame.header, frame.payload)
                ack = {"type": "kv_ack", "request_id": rid, "ok": True}
            except Exception as exc:  # noqa: BLE001 - the sender must learn why, the receiver goes on
                ack = {"type": "kv_ack", "request_id": rid, "ok": False, "error": str(exc) or type(exc).__name__}
            await conn.send(ack)


class KvSender:
    """Ships KV caches to one receiver over a persistent connection (reconnects after a failure)."""

    def __init__(self, host: str, port: int, timeout_s: float | None = DEFAULT_TIMEOUT_S, *,
                 secret: str | None = None) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._secret = secret
        self._conn: FrameConnection | None = None
        self._lock = asyncio.Lock()
        self.bytes_sent = 0

    async def send_kv(self, request_id: str, meta: dict[str, Any], payload: bytes) -> KvAck:
        """Send one cache and wait for its acknowledgement; TransportError when the peer is gone or slow."""
        header = {"type": "kv", "request_id": request_id, "meta": meta}
        async with self._lock:
            if self._conn is None or self._conn.closed:
                conn = await FrameConnection.connect(self.host, self.port, self.timeout_s)
                if self._secret is not None:
                    try:
                        await client_handshake(conn, self._secret, "kv", self.timeout_s)
                    except TransportError:
                        await conn.close()
                        raise
                self._conn = conn
            conn = self._conn
            try:
                self.bytes_sent += await conn.send(header, payload)
                reply = await conn.recv(idle_timeout_s=self.timeout_s)
            except TransportError:
                await conn.close()
                self._conn = None
                raise
        h = reply.header
        if h.get("type") != "kv_ack" or h.get("request_id") != request_id:
            await conn.close()
            self._conn = None
            raise FrameCorruptError(f"unexpected reply to KV frame for {request_id}: {h!r}")
        return KvAck(bool(h.get("ok")), str(h.get("error", "")))

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
