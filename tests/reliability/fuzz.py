"""Structure-aware mutations of valid DICOM instances, and a raw C-STORE client that sends them verbatim.

Used by the seeded CI tests (tests/reliability/test_fuzz_*.py) and by ``benchmarks/fuzz.py`` (the 10,000-case
stress run). Every case is reproducible from ``(seed, index)``.

The base instances are small valid CR images (``tests/helpers/dicomdata.small_instance``) with a nested
sequence added, in Explicit VR Little Endian, Implicit VR Little Endian or JPEG 2000 Lossless. A mutator
walks the dataset's elements (explicit VR: tag, VR, length, value; sequences and items included) and
damages one aspect: an element length, a VR, a sequence item or delimiter, the declared transfer syntax,
the pixel data length, the character set, a huge or undefined length without delimiter, or raw bytes.
"""

from __future__ import annotations

import io
import random
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom.dsutils import decode, encode

from tests.helpers.dicomdata import small_instance

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ALL_VRS = [b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD",
            b"OF", b"OL", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"TM", b"UI", b"UL", b"UN", b"US",
            b"UT", b"UC", b"UR", b"xx", b"\x00\x00"]
_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_DELIMITER = b"\xfe\xff\x0d\xe0"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"
BASE_SYNTAXES = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian), str(JPEG2000Lossless))
OTHER_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5",
                  "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


@dataclass
class Case:
    """One fuzz case: the dataset bytes as a peer would send them and the transfer syntax it claims."""

    index: int
    mutator: str
    transfer_syntax: str  # what the presentation context (or file meta) declares
    sop_class_uid: str
    sop_instance_uid: str
    dataset: bytes  # the encoded dataset, no file meta

    def part10(self) -> bytes:
        """The same bytes as a Part 10 file (preamble, meta with the declared syntax, then the dataset)."""
        meta = Dataset()
        meta.MediaStorageSOPClassUID = self.sop_class_uid
        meta.MediaStorageSOPInstanceUID = self.sop_instance_uid
        meta.TransferSyntaxUID = self.transfer_syntax
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.1"
        body = encode(meta, False, True)
        group_length = struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body))
        return b"\0" * 128 + b"DICM" + group_length + body + self.dataset


@dataclass(frozen=True)
class Element:
    """Where one explicit-VR element sits in the byte string (offsets are absolute)."""

    start: int
    tag: tuple[int, int]
    vr: bytes
    length_offset: int
    length_size: int  # 2 or 4
    length: int
    value_offset: int
    depth: int


def walk_explicit(data: bytes, start: int = 0, end: int | None = None, depth: int = 0) -> Iterator[Element]:
    """The elements of an explicit VR little endian byte string, descending into defined-length sequences."""
    end = len(data) if end is None else end
    position = start
    while position + 8 <= end:
        group, element = struct.unpack_from("<HH", data, position)
        if (group, element) in ((0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)):
            return
        vr = data[position + 4: position + 6]
        if vr in _LONG_VRS:
            if position + 12 > end:
                return
            (length,) = struct.unpack_from("<I", data, position + 8)
            item = Element(position, (group, element), vr, position + 8, 4, length, position + 12, depth)
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            item = Element(position, (group, element), vr, position + 6, 2, length, position + 8, depth)
        yield item
        if length == 0xFFFFFFFF:
            return  # undefined length (encapsulated pixel data): not walked further
        if vr == b"SQ":
            yield from _walk_items(data, item.value_offset, item.value_offset + length, depth + 1)
        position = item.value_offset + length


def _walk_items(data: bytes, start: int, end: int, depth: int) -> Iterator[Element]:
    position = start
    while position + 8 <= end and data[position: position + 4] == _ITEM:
        (length,) = struct.unpack_from("<I", data, position + 4)
        yield Element(position, (0xFFFE, 0xE000), b"", position + 4, 4, length, position + 8, depth)
        if length == 0xFFFFFFFF:
            return
        yield from walk_explicit(data, position + 8, position + 8 + length, depth)
        position += 8 + length


def base_dataset(rng: random.Random, syntax: str) -> Dataset:
    """A valid small CR instance with a nested sequence, fresh UIDs, encoded as ``syntax``."""
    side = (lambda: 64) if syntax == str(JPEG2000Lossless) else (lambda: rng.choice([16, 32, 48, 64]))
    ds = small_instance(seed=rng.randrange(1 << 16), rows=side(), columns=side())
    reference = Dataset()
    reference.ReferencedSOPClassUID = ds.SOPClassUID
    reference.ReferencedSOPInstanceUID = generate_uid()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-D1213", "SRT", "Hand"
    reference.PurposeOfReferenceCodeSequence = Sequence([code])
    ds.ReferencedImageSequence = Sequence([reference])
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImagerPixelSpacing = [0.1, 0.1]  # attributes preprocessing reads: worth damaging too
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    if syntax == str(JPEG2000Lossless):
        ds.compress(JPEG2000Lossless)
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _encode_dataset(ds: Dataset, syntax: str) -> bytes:
    implicit = syntax == str(ImplicitVRLittleEndian)
    data = encode(ds, implicit, True)
    if data is None:
        raise ValueError("could not encode the base dataset")
    return data


# -- mutators: (rng, data, elements) -> (new data, declared syntax or None to keep) ------------------------------
Mutator = Callable[[random.Random, bytearray, list[Element], str], tuple[bytes, str]]


def _pick(rng: random.Random, elements: list[Element], predicate: Callable[[Element], bool] = lambda e: True) -> Element:
    choices = [e for e in elements if predicate(e)] or elements
    return rng.choice(choices)


def _set_length(data: bytearray, element: Element, value: int) -> None:
    if element.length_size == 2:
        struct.pack_into("<H", data, element.length_offset, value & 0xFFFF)
    else:
        struct.pack_into("<I", data, element.length_offset, value & 0xFFFFFFFF)


def element_length(rng: random.Random, data: bytearray, elements: list[Element], syntax: str) -> tuple[bytes, str]:
    element = _pick(rng, elements)
    delta = rng.choice([-3, -2, -1, 1, 2, 3, 7, 64, -element.length])
    _set_length(data, element, max(0, element.length + delta))
    return bytes(data), syntax


def vr_swap(rng: random.Random, data: bytearray, elements: list[Element], syntax: str) -> tuple[bytes, str]:
    element = _pick(rng, elements, lambda e: bool(e.vr))
    data[element.start + 4: element.start + 6] = rng.choice(_ALL_VRS)
    return bytes(data), syntax


def sequence_damage(rng: random.Random, data: bytearray, elements: list[Element], syntax: str) -> tuple[bytes, str]:
    items = [e for e in elements if e.tag == (0xFFFE, 0xE000) or e.vr == b"SQ"]
    if not items:
        return element_length(rng, data, elements, syntax)
    element = rng.choice(items)
    how = rng.randrange(4)
    if how == 0:  # item or sequence length off by a little
        _set_length(data, element, element.length + rng.choice([-8, -1, 1, 8, 1000]))
    elif how == 1:  # undefined length, no delimiter anywhere
        _set_length(data, element, 0xFFFFFFFF)
    elif how == 2:  # the item tag itself damaged
        data[element.start: element.start + 4] = rng.choice([_ITEM_DELIMITER, _SEQUENCE_DELIMITER, b"\xfe\xff\x00\x00"])
    else:  # a stray delimiter inside the item's value
        data[element.value_offset: element.value_offset] = rng.choice([_ITEM_DELIMITER, _SEQUENCE_DELIMITER]) + bytes(4)
    return bytes(data), syntax


def syntax_mismatch(rng: random.Random, data: bytearray, elements: list[Element], syntax: str) -> tuple[bytes, str]:
    """The declared transfer syntax is not the one the bytes are in (e.g. J2K declared, native pixels)."""
    return bytes(data), rng.choice([s for s in OTHER_SYNTAXES if s != syntax])


def truncate(rng: random.Random, data: bytearray, elements: list[Element], syntax: str) -> tuple[bytes, str]:
    pixel = [e for e in elements if e.tag == (0x7FE0, 0x0010)]
    if pixel and rng.random() < 0.7:
        start = pixel[0].value_offset
        cut = rng.randrange(pixel[0].start, len(data)) if len(data) > start else start
    else:
        cut = rng.randrange(1, len(data))
    return bytes(data[:cut]), syntax


def bad_charset(rng: random.Random, data: bytearray, elements: list[Element], syntax: str) -> tuple[bytes, str]:
    charset = [e for e in elements if e.tag == (0x0008, 0x0005)]
    value = rng.choice([b"ISO_IR 999", b"\xff\xfe", b"ISO 2022 IR 87\\ISO 2022 IR 159", b"GB18030 ", b"\x00\x00",
                        b"ISO_IR 192", b"\\\\\\\\"])
    if len(value) % 2:
        value += b" "
    name = [e for e in elements if e.tag == (0x0010, 0x0010)]
    if name:  # a patient name that is not valid in any character set (replaced first: it lies further on)
        element = name[0]
        garbage = bytes(rng.randrange(128, 256) for _ in range(max(2, element.length)))
        data[element.value_offset: element.value_offset + element.length] = garbage
        _set_length(data, element, len(garbage))
    if charset:
        element = charset[0]
        data[element.value_offset: element.value_offset + element.length] = value
        _set_length(data, element, len(value))
    return bytes(data), syntax


def huge_length(rng: random.Random, data: bytearray, elements: list[Element], syntax: str) -> tuple[bytes, str]:
    element = _pick(rng, elements, lambda e: e.length_size == 4)
    _set_length(data, element, rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 0x10000000, len(data) * 4]))
    return bytes(data), syntax


def undefined_length(rng: random.Random, data: bytearray, elements: list[Element], syntax: str) -> tuple[bytes, str]:
    """An OB/OW/UN/SQ or pixel data element declared undefined length, with no delimiter after it."""
    element = _pick(rng, elements, lambda e: e.length_size == 4 and e.vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"))
    _set_length(data, element, 0xFFFFFFFF)
    return bytes(data), syntax


def byte_noise(rng: random.Random, data: bytearray, elements: list[Element], syntax: str) -> tuple[bytes, str]:
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data), syntax


MUTATORS: dict[str, Mutator] = {
    "element_length": element_length,
    "vr_swap": vr_swap,
    "sequence_damage": sequence_damage,
    "syntax_mismatch": syntax_mismatch,
    "truncate": truncate,
    "bad_charset": bad_charset,
    "huge_length": huge_length,
    "undefined_length": undefined_length,
    "byte_noise": byte_noise,
}


def make_case(seed: int, index: int) -> Case:
    """Case ``index`` of the run seeded ``seed`` (the same pair always gives the same bytes, UIDs aside)."""
    rng = random.Random(seed * 1_000_003 + index)
    name = list(MUTATORS)[index % len(MUTATORS)]
    syntax = rng.choice(BASE_SYNTAXES)
    ds = base_dataset(rng, syntax)
    encoded = bytearray(_encode_dataset(ds, syntax))
    # Implicit VR has no VR bytes to walk: mutate it as if explicit where the walk finds nothing.
    elements = list(walk_explicit(bytes(encoded))) if syntax != str(ImplicitVRLittleEndian) else []
    if not elements:
        elements = _implicit_elements(bytes(encoded))
    mutated, declared = MUTATORS[name](rng, encoded, elements, syntax)
    return Case(index, name, declared, str(ds.SOPClassUID), str(ds.SOPInstanceUID), mutated)


def _implicit_elements(data: bytes) -> list[Element]:
    """Top-level implicit VR elements (tag, 4-byte length), so length mutators work on implicit data too."""
    elements, position = [], 0
    while position + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, position)
        elements.append(Element(position, (group, element), b"", position + 4, 4, length, position + 8, 0))
        if length == 0xFFFFFFFF or position + 8 + length > len(data):
            break
        position += 8 + length
    return elements


def cases(seed: int, count: int, start: int = 0) -> Iterator[Case]:
    """Cases ``start`` .. ``start + count - 1`` of the run seeded ``seed``."""
    for index in range(start, start + count):
        yield make_case(seed, index)


# -- a raw C-STORE client ------------------------------------------------------------------------------------------
def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(calling: str, called: str, contexts: list[tuple[int, str, str]]) -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2) with ``(context id, abstract syntax, transfer syntax)`` contexts."""
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    for context_id, abstract, transfer in contexts:
        body += _item(0x20, bytes([context_id, 0, 0, 0]) + _item(0x30, abstract.encode()) + _item(0x40, transfer.encode()))
    body += _item(0x50, _item(0x51, struct.pack(">I", 1 << 20)) + _item(0x52, b"1.2.826.0.1.3680043.9.1"))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _pdata(context_id: int, control: int, payload: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, control) + payload
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def c_store_command(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    command = Dataset()
    command.AffectedSOPClassUID = sop_class
    command.CommandField = 0x0001
    command.MessageID = message_id
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = sop_instance
    command.CommandGroupLength = len(encode(command, True, True))
    return encode(command, True, True)


class RawAssociationClosed(Exception):
    """The node aborted or closed the association (what it does with data it cannot even frame)."""


@dataclass
class RawStoreClient:
    """C-STOREs whose dataset bytes go on the wire exactly as given (no parser on our side to repair them)."""

    host: str
    port: int
    calling: str = "PYSCU"
    called: str = "MSKNODE"
    timeout: float = 30.0
    sock: socket.socket | None = None
    contexts: dict[tuple[str, str], int] = field(default_factory=dict)
    message_id: int = 0

    def open(self, pairs: list[tuple[str, str]]) -> None:
        """Associate proposing each (SOP class, transfer syntax) pair as its own context."""
        self.close()
        proposed = [(2 * i + 1, sop, syntax) for i, (sop, syntax) in enumerate(dict.fromkeys(pairs))]
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.sendall(associate_rq(self.calling, self.called, proposed))
        pdu_type, body = self._read_pdu()
        if pdu_type != 0x02:
            raise RawAssociationClosed(f"association not accepted (PDU type {pdu_type:#x})")
        accepted = set()
        position = 68  # after the fixed A-ASSOCIATE-AC fields
        while position + 4 <= len(body):
            item_type, _, length = struct.unpack_from(">BBH", body, position)
            if item_type == 0x21 and body[position + 6] == 0:  # presentation context result: acceptance
                accepted.add(body[position + 4])
            position += 4 + length
        self.contexts = {(sop, syntax): cid for cid, sop, syntax in proposed if cid in accepted}

    def _recv_exact(self, count: int) -> bytes:
        assert self.sock is not None
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise RawAssociationClosed("connection closed by the node")
            data += chunk
        return data

    def _read_pdu(self) -> tuple[int, bytes]:
        header = self._recv_exact(6)
        pdu_type, _, length = struct.unpack(">BBI", header)
        return pdu_type, self._recv_exact(length)

    def store(self, case: Case) -> int:
        """Send one case; returns the C-STORE status, or raises :class:`RawAssociationClosed`."""
        context_id = self.contexts.get((case.sop_class_uid, case.transfer_syntax))
        if self.sock is None or context_id is None:
            raise RawAssociationClosed("no accepted presentation context for this case")
        self.message_id += 1
        try:
            self.sock.sendall(_pdata(context_id, 0x03, c_store_command(self.message_id, case.sop_class_uid,
                                                                       case.sop_instance_uid))
                              + _pdata(context_id, 0x02, case.dataset))
            pdu_type, body = self._read_pdu()
        except OSError as exc:
            raise RawAssociationClosed(f"connection lost: {exc}") from exc
        if pdu_type != 0x04:
            raise RawAssociationClosed(f"PDU type {pdu_type:#x} instead of the C-STORE response")
        command = b""
        position = 0
        while position < len(body):
            (length,) = struct.unpack_from(">I", body, position)
            command += body[position + 6: position + 4 + length]
            position += 4 + length
        response = decode(io.BytesIO(command), True, True)
        return int(response.Status)

    def release(self) -> None:
        if self.sock is not None:
            try:
                self.sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))
                self._read_pdu()
            except (OSError, RawAssociationClosed):
                pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def run_over_network(host: str, port: int, all_cases: list[Case], per_association: int = 50,
                     calling: str = "PYSCU", called: str = "MSKNODE") -> dict[int, int | str]:
    """Send every case; returns case index -> status (int) or ``"aborted"`` when the node dropped it.

    Cases go in batches of ``per_association`` over one association; after an abort the rest of the batch
    continues on a fresh association.
    """
    outcomes: dict[int, int | str] = {}
    client = RawStoreClient(host, port, calling, called)
    for start in range(0, len(all_cases), per_association):
        batch = all_cases[start: start + per_association]
        pairs = [(case.sop_class_uid, case.transfer_syntax) for case in batch]
        position = 0
        while position < len(batch):
            if client.sock is None:
                client.open(pairs)
            case = batch[position]
            try:
                outcomes[case.index] = client.store(case)
            except RawAssociationClosed:
                outcomes[case.index] = "aborted"
                client.close()
            position += 1
        client.release()
    return outcomes
