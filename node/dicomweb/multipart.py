"""A streaming ``multipart/related`` reader (RFC 2046 5.1, RFC 2387) for STOW-RS request bodies.

The body is consumed chunk by chunk as the client sends it; each part's bytes go straight to a sink (a file in
the spool's ``.incoming``), so a 2 GB instance never sits in memory: the reader keeps at most one chunk plus
the length of the delimiter. Pure: no I/O of its own, no protocol beyond MIME.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

MAX_HEADER_BYTES = 16 * 1024
MAX_BOUNDARY = 256


class MultipartError(ValueError):
    """The body is not well-formed ``multipart/related`` (the request is answered 400)."""


@dataclass
class Part:
    """One body part: its headers (lower-case names) and what its sink made of its bytes."""

    headers: dict[str, str]
    size: int = 0
    result: object = None

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype; a=b; c="d"`` → (``type/subtype`` lower-cased, parameters with lower-case names)."""
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    while rest:
        item, rest = _split_parameter(rest)
        name, sep, raw = item.partition("=")
        if not sep:
            continue
        raw = raw.strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = raw[1:-1].replace('\\"', '"')
        params[name.strip().lower()] = raw
    return main.strip().lower(), params


def _split_parameter(text: str) -> tuple[str, str]:
    """The first ``;``-separated parameter of ``text`` (quotes respected) and the rest."""
    quoted = False
    for index, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            return text[:index], text[index + 1:]
    return text, ""


class PartSink:
    """Where one part's bytes go; made by the caller for each part once its headers are known."""

    def write(self, data: bytes) -> None:  # pragma: no cover - protocol
        raise NotImplementedError

    def close(self) -> object:  # pragma: no cover - protocol
        """The part ended whole; returns what is recorded as :attr:`Part.result`."""
        raise NotImplementedError

    def abort(self) -> None:  # pragma: no cover - protocol
        """The body ended inside this part (or a later check failed): discard it."""
        raise NotImplementedError


@dataclass
class _State:
    buffer: bytearray = field(default_factory=bytearray)
    size: int = 0


async def read_parts(chunks: AsyncIterator[bytes], boundary: str, open_sink: Callable[[Part], PartSink],
                     max_bytes: int | None = None) -> AsyncIterator[Part]:
    """Yield each part once it has been read whole and its sink closed.

    ``open_sink(part)`` is called when a part's headers are complete. ``max_bytes`` bounds the whole body:
    past it :class:`BodyTooLarge` is raised (the sink of the part being read is aborted). A body that ends
    before the closing delimiter raises :class:`MultipartError` after aborting the open sink.
    """
    # RFC 2046 allows 70 characters; Orthanc's STOW-RS client sends longer ones, so a generous bound only.
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise MultipartError(f"multipart boundary missing or longer than {MAX_BOUNDARY} characters")
    dash = b"--" + boundary.encode("latin-1")
    delimiter = b"\r\n" + dash
    state = _State()
    # The first delimiter may open the body without a preceding CRLF: pretend one was there.
    state.buffer += b"\r\n"
    phase = "preamble"
    sink: PartSink | None = None
    part: Part | None = None
    source = chunks.__aiter__()
    exhausted = False

    async def more() -> bool:
        nonlocal exhausted
        if exhausted:
            return False
        try:
            chunk = await source.__anext__()
        except StopAsyncIteration:
            exhausted = True
            return False
        state.size += len(chunk)
        if max_bytes is not None and state.size > max_bytes:
            raise BodyTooLarge(max_bytes)
        state.buffer += chunk
        return True

    try:
        while True:
            if phase == "preamble":
                index = state.buffer.find(delimiter)
                if index < 0:
                    del state.buffer[: max(0, len(state.buffer) - len(delimiter))]
                    if not await more():
                        raise MultipartError("no multipart delimiter in the body")
                    continue
                del state.buffer[: index + len(delimiter)]
                phase = "after-delimiter"
            elif phase == "after-delimiter":
                while len(state.buffer) < 2:
                    if not await more():
                        raise MultipartError("body ends after a delimiter")
                if state.buffer[:2] == b"--":
                    return  # the close delimiter; an epilogue is ignored
                # transport padding (spaces, tabs) may follow a delimiter before its CRLF
                end = state.buffer.find(b"\r\n")
                while end < 0:
                    if len(state.buffer) > 1024 or not await more():
                        raise MultipartError("malformed multipart delimiter line")
                    end = state.buffer.find(b"\r\n")
                if state.buffer[:end].strip(b" \t"):
                    raise MultipartError("malformed multipart delimiter line")
                del state.buffer[: end + 2]
                phase = "headers"
            elif phase == "headers":
                end = state.buffer.find(b"\r\n\r\n")
                if state.buffer.startswith(b"\r\n"):
                    end, skip = 0, 2
                else:
                    skip = 4
                while end < 0:
                    if len(state.buffer) > MAX_HEADER_BYTES:
                        raise MultipartError("multipart part headers too long")
                    if not await more():
                        raise MultipartError("body ends inside part headers")
                    if state.buffer.startswith(b"\r\n"):
                        end, skip = 0, 2
                    else:
                        end = state.buffer.find(b"\r\n\r\n")
                part = Part(_parse_headers(bytes(state.buffer[:end])))
                del state.buffer[: end + skip]
                sink = open_sink(part)
                phase = "body"
            else:  # body
                assert sink is not None and part is not None
                index = state.buffer.find(delimiter)
                if index < 0:
                    keep = len(delimiter) - 1
                    if len(state.buffer) > keep:
                        data = bytes(state.buffer[: len(state.buffer) - keep])
                        del state.buffer[: len(state.buffer) - keep]
                        sink.write(data)
                        part.size += len(data)
                    if not await more():
                        raise MultipartError("body ends inside a part (no closing delimiter)")
                    continue
                if index:
                    sink.write(bytes(state.buffer[:index]))
                    part.size += index
                del state.buffer[: index + len(delimiter)]
                finished, sink = sink, None
                part.result = finished.close()
                done, part = part, None
                yield done
                phase = "after-delimiter"
    except BaseException:
        if sink is not None:
            sink.abort()
        raise


class BodyTooLarge(MultipartError):
    """The body exceeds the configured limit (the request is answered 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not block:
        return headers
    for line in block.decode("latin-1").split("\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise MultipartError("malformed multipart part header")
        headers[name.strip().lower()] = value.strip()
    return headers
