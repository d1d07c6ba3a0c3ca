"""Disk full during a study, on a real small filesystem: the spool sits on a 6 MB tmpfs with a 1 MB watermark.

What tests/dicom/test_resources.py does not already cover: the disk fills *part-way through a study* on a
running node, the instances acknowledged before that stay intact, the refused ones leave nothing behind, a
new association is turned away while the disk is full, and once space returns the same sender's re-sends
succeed and the whole study is analysed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select

from storage.models import ImageResultRow, Job
from tests.helpers.models import tiny_model
from tests.helpers.node import NodeProcess, Peer, wait_for
from tests.dicom.test_resources import small_filesystem  # noqa: F401  (the 6 MB tmpfs fixture, root only)
from tests.reliability.harness import SENDER_AE, CrashConfig, plan_studies

pytestmark = [pytest.mark.slow]
OUT_OF_RESOURCES = 0xA700


class SmallSpoolConfig(CrashConfig):
    """The pipeline with its spool on the small filesystem (the database stays on the ordinary disk)."""

    spool_on: Path

    @property
    def spool_dir(self) -> Path:
        return self.spool_on / "spool"


def associate(port: int, sop_class: str):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(sop_class, ImplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title="MSKNODE")


def test_disk_fills_mid_study_then_space_returns_and_the_study_is_analysed(
        small_filesystem: Path, tmp_path: Path) -> None:  # noqa: F811
    config = SmallSpoolConfig(directory=tmp_path / "node", roles=("receiver", "scheduler", "worker"),
                              peers=(Peer("modality", SENDER_AE),), min_free_disk_mb=1)
    config.spool_on = small_filesystem
    config.model = tiny_model(tmp_path / "tiny-model")
    node = NodeProcess(config).start(timeout=120)
    try:
        [study] = plan_studies(1, 6, seed=7, size=256)  # six 128 KB instances
        # Leave 1.4 MB: two or three instances fit above the 1 MB watermark, the rest do not.
        filler = small_filesystem / "filler"
        with open(filler, "wb") as handle:
            handle.write(b"\0" * (shutil.disk_usage(small_filesystem).free - 1400 * 1024))

        assoc = associate(node.port, study.instances[0].SOPClassUID)
        assert assoc.is_established
        try:
            statuses = {ds.SOPInstanceUID: assoc.send_c_store(ds).Status for ds in study.instances}
            acknowledged = {sop for sop, status in statuses.items() if status == 0x0000}
            refused = {sop for sop, status in statuses.items() if status != 0x0000}
            assert acknowledged and refused, statuses
            assert set(statuses[sop] for sop in refused) == {OUT_OF_RESOURCES}, statuses

            # A refused instance is deleted, so free space is back just above the watermark; once something
            # else takes that too, a new association is turned away (transiently) before any data.
            with open(filler, "ab") as handle:
                handle.write(b"\0" * (shutil.disk_usage(small_filesystem).free - 512 * 1024))
            other = associate(node.port, study.instances[0].SOPClassUID)
            assert other.is_rejected, "a new association was accepted with the spool below its watermark"

            # Nothing acknowledged is lost or damaged; nothing refused is left half-written.
            rows = {row.sop_instance_uid: row for row in node.instances()}
            assert set(rows) == acknowledged
            sent = {ds.SOPInstanceUID: ds for ds in study.instances}
            for sop, row in rows.items():
                stored = pydicom.dcmread(node.spool / row.spool_path)
                assert stored.PixelData == sent[sop].PixelData
            assert node.incoming_files() == []

            filler.unlink()  # space returns: the same sender re-sends what was refused, on the same association
            for sop in sorted(refused):
                assert assoc.send_c_store(sent[sop]).Status == 0x0000
        finally:
            if assoc.is_established:
                assoc.release()

        assert {row.sop_instance_uid for row in node.instances()} == set(sent)

        def analysed() -> int | None:
            with node.database() as db, db.session() as session:
                job = session.scalars(select(Job).where(Job.state.in_(("done", "failed")))).first()
                if job is None:
                    return None
                assert job.state == "done", job.last_error
                return len(session.scalars(select(ImageResultRow).where(
                    ImageResultRow.job_id == job.id, ImageResultRow.state == "analysed")).all())

        assert wait_for(analysed, 120, "the study to be analysed", 0.5) == len(sent)
    finally:
        node.stop(timeout=60)
