"""STOW-RS into a real ``msknode serve --role dicomweb``, as a VNA or cloud PACS would push: dicomweb-client (and
raw HTTP for what a client library will not send). The same guarantees as C-STORE: durable and indexed before
the 200, duplicates by content hash, failures per instance, bearer token per peer, watermark before anything
is acknowledged, an audit row per request."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid
from requests.exceptions import HTTPError

from storage.spool import sha256_of
from tests.helpers.dicomdata import small_instance
from tests.helpers.node import NodeConfig, NodeProcess, Peer, free_port, wait_for_port

TOKEN = "vna-token-" + uuid.uuid4().hex
OTHER_TOKEN = "other-" + uuid.uuid4().hex
HUGE_MB = 1 << 40

FAILED_SOP_SEQUENCE = "FailedSOPSequence"
REFERENCED_SOP_SEQUENCE = "ReferencedSOPSequence"


def start_node(directory: Path, min_free_disk_mb: int = 0) -> NodeProcess:
    port = free_port()
    config = NodeConfig(
        directory=directory,
        min_free_disk_mb=min_free_disk_mb,
        roles=("dicomweb",),
        dicomweb_port=port,
        peers=(Peer("vna", "VNA", stow_token=TOKEN), Peer("blocked", "BLOCKED", may_send=False, stow_token=OTHER_TOKEN)),
    )
    node = NodeProcess(config).start()
    wait_for_port("127.0.0.1", port, 30, node.process)
    return node


def base_url(node: NodeProcess) -> str:
    return f"http://127.0.0.1:{node.config.dicomweb_port}/dicom-web"


def client(node: NodeProcess, token: str = TOKEN) -> DICOMwebClient:
    return DICOMwebClient(base_url(node), headers={"Authorization": f"Bearer {token}"})


def part10(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart(*parts: bytes, boundary: str = "msknode-test-boundary") -> tuple[bytes, str]:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
                    for part in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


@pytest.fixture
def node(tmp_path: Path):
    node = start_node(tmp_path / "node")
    yield node
    node.stop()


def uids(response: pydicom.Dataset, keyword: str) -> list[str]:
    return [str(item.ReferencedSOPInstanceUID) for item in response.get(keyword, [])]


def test_stow_stores_durably_and_answers_each_instance(node: NodeProcess) -> None:
    study = generate_uid()
    datasets = [small_instance(study_uid=study, seed=i, instance_number=i + 1) for i in range(3)]
    response = client(node).store_instances(datasets)
    assert sorted(uids(response, REFERENCED_SOP_SEQUENCE)) == sorted(ds.SOPInstanceUID for ds in datasets)
    assert FAILED_SOP_SEQUENCE not in response
    # Indexed and on disk (committed before the answer), with the peer's AE title and an audit row.
    rows = node.instances()
    assert sorted(row.sop_instance_uid for row in rows) == sorted(ds.SOPInstanceUID for ds in datasets)
    assert {row.calling_ae_title for row in rows} == {"VNA"}
    assert len(node.spool_files()) == 3 and node.incoming_files() == []
    for row in rows:
        assert (row.sha256, row.size_bytes) == sha256_of(node.spool / row.spool_path)
        stored = pydicom.dcmread(node.spool / row.spool_path)
        assert stored.PixelData == next(ds for ds in datasets if ds.SOPInstanceUID == row.sop_instance_uid).PixelData
    (audit,) = node.wait_for_associations_closed()
    assert (audit.calling_ae_title, audit.called_ae_title, audit.peer_name, audit.outcome, audit.instance_count) == (
        "VNA", "STOW-RS", "vna", "released", 3)
    assert {row.association_id for row in rows} == {audit.id}


def test_duplicate_is_a_no_op_and_a_study_url_checks_the_study(node: NodeProcess) -> None:
    study = generate_uid()
    ds = small_instance(study_uid=study, seed=7)
    first = client(node).store_instances([ds], study_instance_uid=study)
    again = client(node).store_instances([ds], study_instance_uid=study)
    assert uids(first, REFERENCED_SOP_SEQUENCE) == uids(again, REFERENCED_SOP_SEQUENCE) == [ds.SOPInstanceUID]
    assert len(node.instances()) == 1 and len(node.spool_files()) == 1
    assert node.replacements() == []

    # An instance of another study POSTed to /studies/{study}: that instance fails (409: none stored).
    other = small_instance(seed=8)
    with pytest.raises(HTTPError) as caught:
        client(node).store_instances([other], study_instance_uid=study)
    assert caught.value.response.status_code == 409
    failed = pydicom.Dataset.from_json(caught.value.response.json())
    assert uids(failed, FAILED_SOP_SEQUENCE) == [other.SOPInstanceUID]
    assert failed.FailedSOPSequence[0].FailureReason == 0xC000
    assert len(node.instances()) == 1


def test_a_malformed_instance_fails_alone_and_the_others_are_stored(node: NodeProcess) -> None:
    study = generate_uid()
    good = [small_instance(study_uid=study, seed=i) for i in range(2)]
    broken = small_instance(study_uid=study, seed=9)
    del broken.PixelData  # image attributes without pixel data: a cut-off transfer, refused by the header checks
    response = client(node).store_instances([good[0], broken, good[1]])  # 202: dicomweb-client returns the body
    assert sorted(uids(response, REFERENCED_SOP_SEQUENCE)) == sorted(ds.SOPInstanceUID for ds in good)
    assert uids(response, FAILED_SOP_SEQUENCE) == [broken.SOPInstanceUID]
    assert response.FailedSOPSequence[0].FailureReason == 0xC000
    assert sorted(row.sop_instance_uid for row in node.instances()) == sorted(ds.SOPInstanceUID for ds in good)

    # Raw parts no client library sends: a truncated Part 10 file and bytes that are no DICOM at all.
    whole = part10(small_instance(study_uid=study, seed=20))
    truncated = part10(small_instance(study_uid=study, seed=21))[:-1000]
    body, content_type = multipart(whole, truncated, b"not dicom at all")
    answer = httpx.post(base_url(node) + "/studies", content=body,
                        headers={"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert answer.status_code == 202, answer.text
    result = pydicom.Dataset.from_json(answer.json())
    assert len(result.ReferencedSOPSequence) == 1 and len(result.FailedSOPSequence) == 2
    assert [item.FailureReason for item in result.FailedSOPSequence] == [0xC000, 0xC000]
    assert len(node.instances()) == 3 and node.incoming_files() == []


def test_a_malformed_body_is_400_and_a_cut_body_leaves_nothing_half_written(node: NodeProcess) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    answer = httpx.post(base_url(node) + "/studies", content=b"garbage", timeout=30, headers={
        **headers, "Content-Type": 'multipart/related; type="application/dicom"; boundary=abc'})
    assert answer.status_code == 400
    answer = httpx.post(base_url(node) + "/studies", content=b"x", timeout=30, headers={
        **headers, "Content-Type": 'multipart/related; type="application/dicom+json"; boundary=abc'})
    assert answer.status_code == 415
    body, content_type = multipart(part10(small_instance(seed=30)))
    answer = httpx.post(base_url(node) + "/studies", content=body[:-40], timeout=30,  # no closing delimiter
                        headers={**headers, "Content-Type": content_type})
    assert answer.status_code == 400
    assert node.instances() == [] and node.incoming_files() == []
    rows = node.wait_for_associations_closed()
    assert [row.outcome for row in rows if row.reject_reason is None] == ["aborted", "aborted"]


def test_bad_or_missing_token_is_401_and_a_peer_that_may_not_send_is_403(node: NodeProcess) -> None:
    ds = small_instance(seed=40)
    for token in ("wrong-token", TOKEN.upper()):
        with pytest.raises(HTTPError) as caught:
            client(node, token).store_instances([ds])
        assert caught.value.response.status_code == 401
        assert caught.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    body, content_type = multipart(part10(ds))
    assert httpx.post(base_url(node) + "/studies", content=body, headers={"Content-Type": content_type},
                      timeout=30).status_code == 401
    with pytest.raises(HTTPError) as caught:
        client(node, OTHER_TOKEN).store_instances([ds])
    assert caught.value.response.status_code == 403
    assert node.instances() == [] and node.spool_files() == [] and node.incoming_files() == []
    reasons = sorted(row.reject_reason for row in node.associations())
    assert reasons == ["no-bearer-token", "peer-may-not-send", "token-not-recognised", "token-not-recognised"]


def test_disk_below_watermark_is_503_before_anything_is_acknowledged(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", min_free_disk_mb=HUGE_MB)
    try:
        body, content_type = multipart(part10(small_instance(seed=50)), part10(small_instance(seed=51)))
        answer = httpx.post(base_url(node) + "/studies", content=body, timeout=30,
                            headers={"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 503 and answer.headers["Retry-After"]
        assert "ReferencedSOPSequence" not in answer.text and "00081199" not in answer.text
        assert node.instances() == [] and node.spool_files() == [] and node.incoming_files() == []
        (row,) = node.associations()
        assert (row.outcome, row.reject_reason, row.peer_name) == ("rejected", "disk-below-watermark", "vna")
    finally:
        node.stop()


@pytest.mark.slow
def test_a_large_instance_is_streamed_to_disk_not_held_in_memory(node: NodeProcess) -> None:
    """A 256 MB instance sent with chunked encoding: the role's peak memory grows by far less than its size."""
    rows, columns = 8192, 16384
    size = rows * columns * 2
    header_ds = small_instance(rows=rows, columns=columns, seed=60)
    del header_ds.PixelData
    head = part10(header_ds) + b"\xe0\x7f\x10\x00OW\x00\x00" + size.to_bytes(4, "little")
    boundary = "big-instance-boundary"

    def body():
        yield b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + head
        block = bytes(1 << 20)
        for _ in range(size >> 20):
            yield block
        yield b"\r\n--" + boundary.encode() + b"--\r\n"

    def peak_rss_kb() -> int:
        for line in Path(f"/proc/{node.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    before = peak_rss_kb()
    answer = httpx.post(base_url(node) + "/studies", content=body(), timeout=300, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200, answer.text
    (row,) = node.instances()
    assert row.size_bytes == len(head) + size
    # hashed while it was written, never read back: the indexed digest is still the stored file's
    assert (row.sha256, row.size_bytes) == sha256_of(node.spool / row.spool_path)
    grown_mb = (peak_rss_kb() - before) / 1024
    assert grown_mb < 64, f"peak memory grew by {grown_mb:.0f} MB for a {size >> 20} MB instance"
