"""KV transport: framing, checksums, timeouts, peer death, acknowledgements."""

from __future__ import annotations

import asyncio
import os
import struct
import zlib

import pytest

from thunderserve.runtime.kv.transport import (
    Frame,
    FrameConnection,
    FrameCorruptError,
    FrameServer,
    KvReceiver,
    KvSender,
    PeerClosedError,
    TransportTimeoutError,
    encode_frame,
    read_frame,
)

pytestmark = pytest.mark.anyio


def _reader_with(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def test_frame_round_trip_in_memory() -> None:
    data = encode_frame({"type": "kv", "request_id": "r1", "meta": {"n": 3}}, b"\x00\x01payload")
    frame = await read_frame(_reader_with(data))
    assert frame == Frame({"type": "kv", "request_id": "r1", "meta": {"n": 3}}, b"\x00\x01payload")


async def test_flipped_payload_bit_is_detected() -> None:
    data = bytearray(encode_frame({"request_id": "r1"}, b"x" * 1000))
    data[-10] ^= 0x01
    with pytest.raises(FrameCorruptError, match="checksum"):
        await read_frame(_reader_with(bytes(data)))


async def test_corrupted_length_field_is_detected() -> None:
    data = bytearray(encode_frame({"request_id": "r1"}, b"abc"))
    struct.pack_into(">Q", data, 8, 1 << 62)  # payload length far beyond the limit
    with pytest.raises(FrameCorruptError, match="impossible"):
        await read_frame(_reader_with(bytes(data)))


async def test_bad_magic_is_detected() -> None:
    with pytest.raises(FrameCorruptError, match="magic"):
        await read_frame(_reader_with(b"XXXX" + encode_frame({})[4:]))


async def test_header_checksum_covers_the_header() -> None:
    data = bytearray(encode_frame({"request_id": "r1"}, b""))
    data[21] ^= 0x20  # a byte inside the JSON header
    with pytest.raises(FrameCorruptError):
        await read_frame(_reader_with(bytes(data)))


async def test_truncated_frame_is_peer_closed() -> None:
    data = encode_frame({"request_id": "r1"}, b"y" * 100)
    with pytest.raises(PeerClosedError, match="mid-frame"):
        await read_frame(_reader_with(data[:-5]))
    with pytest.raises(PeerClosedError):
        await read_frame(_reader_with(b""))


async def test_stalled_frame_times_out() -> None:
    data = encode_frame({"request_id": "r1"}, b"z" * 100)
    reader = _reader_with(data[:30], eof=False)  # the peer stops sending mid-frame
    with pytest.raises(TransportTimeoutError):
        await read_frame(reader, timeout_s=0.1)
    with pytest.raises(TransportTimeoutError):
        await read_frame(_reader_with(b"", eof=False), idle_timeout_s=0.1)


async def test_kv_round_trip_over_tcp_with_ack_and_large_payload() -> None:
    got: list[tuple[dict, bytes]] = []

    async def on_kv(header: dict, payload: bytes) -> None:
        got.append((header, payload))

    receiver = KvReceiver(on_kv)
    port = await receiver.start()
    sender = KvSender("127.0.0.1", port, timeout_s=10)
    big = os.urandom(24 * 1024 * 1024)
    try:
        ack = await sender.send_kv("r1", {"prompt_tokens": 7}, b"small")
        ack2 = await sender.send_kv("r2", {"prompt_tokens": 9}, big)
    finally:
        await sender.close()
        await receiver.close()
    assert ack.ok and ack2.ok
    assert got[0][0]["request_id"] == "r1" and got[0][0]["meta"] == {"prompt_tokens": 7} and got[0][1] == b"small"
    assert got[1][1] == big and zlib.crc32(got[1][1]) == zlib.crc32(big)
    assert sender.bytes_sent > len(big)


async def test_receiver_refusal_comes_back_in_the_ack() -> None:
    async def on_kv(header: dict, payload: bytes) -> None:
        raise ValueError("no room for r1")

    receiver = KvReceiver(on_kv)
    port = await receiver.start()
    sender = KvSender("127.0.0.1", port)
    try:
        ack = await sender.send_kv("r1", {}, b"data")
    finally:
        await sender.close()
        await receiver.close()
    assert not ack.ok and ack.error == "no room for r1"


async def test_dead_peer_raises_peer_closed() -> None:
    async def die(conn: FrameConnection) -> None:
        await conn.recv()
        conn.writer.transport.abort()  # crash before acknowledging

    server = FrameServer(die)
    port = await server.start()
    sender = KvSender("127.0.0.1", port, timeout_s=5)
    try:
        with pytest.raises(PeerClosedError):
            await sender.send_kv("r1", {}, b"data")
    finally:
        await sender.close()
        await server.close()
    with pytest.raises(PeerClosedError, match="cannot connect"):
        await KvSender("127.0.0.1", port, timeout_s=2).send_kv("r2", {}, b"")


async def test_silent_peer_times_out() -> None:
    async def mute(conn: FrameConnection) -> None:
        await conn.recv()
        await asyncio.sleep(10)

    server = FrameServer(mute)
    port = await server.start()
    sender = KvSender("127.0.0.1", port, timeout_s=0.2)
    try:
        with pytest.raises(TransportTimeoutError):
            await sender.send_kv("r1", {}, b"data")
    finally:
        await sender.close()
        await server.close()
