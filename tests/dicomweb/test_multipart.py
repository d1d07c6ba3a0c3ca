"""The streaming multipart/related reader: parts come out whole whatever the chunking (a delimiter split across
chunks, one byte at a time), preambles, padding and epilogues are tolerated, and a cut or malformed body aborts
the open part."""

from __future__ import annotations

import asyncio
import os

import pytest

from node.dicomweb.multipart import BodyTooLarge, MultipartError, Part, PartSink, media_type, read_parts


class Sink(PartSink):
    def __init__(self, log: list[str]) -> None:
        self.data = bytearray()
        self.log = log

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> bytes:
        self.log.append("closed")
        return bytes(self.data)

    def abort(self) -> None:
        self.log.append("aborted")


def parse(body: bytes, chunk: int, boundary: str = "b0undary", max_bytes: int | None = None) -> tuple[list[Part], list[str]]:
    log: list[str] = []

    async def chunks():
        for start in range(0, len(body), chunk):
            yield body[start:start + chunk]

    async def run() -> list[Part]:
        return [part async for part in read_parts(chunks(), boundary, lambda part: Sink(log), max_bytes=max_bytes)]

    return asyncio.run(run()), log


PAYLOADS = [os.urandom(3000), b"\r\n--b0undar" + os.urandom(50) + b"\r\n--b0undarX-not", b""]


def body_of(payloads: list[bytes], preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    return preamble + b"".join(b"--b0undary  \r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                               for p in payloads) + b"--b0undary--" + epilogue


@pytest.mark.parametrize("chunk", [1, 2, 7, 13, 64, 1000, 1 << 20])
def test_parts_are_whole_whatever_the_chunking(chunk: int) -> None:
    parts, log = parse(body_of(PAYLOADS, b"preamble text\r\n", b"\r\nepilogue"), chunk)
    assert [part.result for part in parts] == PAYLOADS
    assert [part.content_type for part in parts] == ["application/dicom"] * 3
    assert [part.size for part in parts] == [len(p) for p in PAYLOADS]
    assert log == ["closed"] * 3


@pytest.mark.parametrize("cut", [5, 60, 2000, -20, -3])
def test_a_cut_body_aborts_the_open_part(cut: int) -> None:
    body = body_of(PAYLOADS[:1])
    with pytest.raises(MultipartError):
        parse(body[:cut], 16)


def test_limits_and_malformed_input() -> None:
    with pytest.raises(BodyTooLarge):
        parse(body_of(PAYLOADS[:1]), 100, max_bytes=1000)
    with pytest.raises(MultipartError):
        parse(b"--b0undary\r\nno colon here\r\n\r\nx\r\n--b0undary--", 8)
    with pytest.raises(MultipartError):
        parse(body_of(PAYLOADS[:1]), 8, boundary="")
    assert media_type('multipart/related; type="application/dicom"; boundary="a;b"') == (
        "multipart/related", {"type": "application/dicom", "boundary": "a;b"})
