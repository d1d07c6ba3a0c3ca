"""No PHI leaves the node unasked: an end-to-end run (storescu -> node -> storescp, plus a webhook) at DEBUG
log level, then every log line and every webhook body is scanned for the phantom patient's name and ID.

With ``notifications.include_phi = true`` the webhook does carry them, which proves the scan can find them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import config as pydicom_config

from tests.helpers.dicomdata import small_instance
from tests.helpers.models import tiny_model
from tests.helpers.node import NodeProcess, Peer, free_port, wait_for
from tests.helpers.tools import require_tool, storescu, start_storescp
from tests.delivery.test_notifications import WebhookReceiver
from tests.pipeline.test_orthanc_end_to_end import PipelineConfig

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

FAMILY, GIVEN, PATIENT_ID = "Quixotez", "Dulcinella", "PHI-ID-90210"


class NotifyingConfig(PipelineConfig):
    """Every role, the ``ed`` peer urgent (so its studies are announced), a webhook, two masked passes."""

    notifications: str = ""

    def write(self) -> Path:
        path = super().write()
        blocks = path.read_text().split("[[peers]]")
        for index, block in enumerate(blocks):
            if 'name = "ed"\n' in block:
                lines = [line for line in block.splitlines() if not line.startswith("priority =")]
                blocks[index] = "\n".join([*lines, 'priority = "urgent"', "", ""])
        text = "[[peers]]".join(blocks).replace("passes = 10", "passes = 2")
        path.write_text(text + self.notifications)
        return path


def phi_found(text: str) -> list[str]:
    """Which of the patient's identifiers occur in ``text`` (name parts case-insensitively)."""
    lowered = text.lower()
    return [token for token in (FAMILY, GIVEN, PATIENT_ID) if token.lower() in lowered]


def dirty_patient(image) -> None:  # type: ignore[no-untyped-def]
    """Malformed and unusual values, each carrying the identifiers (pydicom's warnings would quote them):
    an overlong name component with odd characters, a patient ID with a control character and over its
    VR's length, another ID under a wrong VR, a UID that is none, an overlong accession number."""
    image.PatientName = f"{FAMILY}^{GIVEN}^" + "x" * 70 + "\u00e9\u2603"
    image.PatientID = PATIENT_ID + "\x01" + "y" * 70
    image.add_new(0x00101000, "DA", PATIENT_ID)  # Other Patient IDs, wrong VR
    image.add_new(0x00200052, "UI", f"1.2.{FAMILY}.3")  # Frame of Reference UID that is no UID
    image.AccessionNumber = "ACC-PHI-1" + "z" * 30


@pytest.mark.parametrize(("include_phi", "dirty"), [(False, False), (True, False), (False, True)],
                         ids=["default", "include_phi", "malformed-values"])
def test_logs_and_webhooks_carry_no_patient_name_or_id(tmp_path: Path, include_phi: bool, dirty: bool) -> None:
    require_tool("storescu")
    results_port = free_port()
    received = tmp_path / "storescp"
    scp = start_storescp(received, results_port, ae_title="RESULTS")
    with WebhookReceiver(fail_first=1) as hook:
        config = NotifyingConfig(
            directory=tmp_path / "node", roles=("receiver", "scheduler", "worker", "sender"), log_level="DEBUG",
            peers=(Peer("ed", "EDSCU"), Peer("results", "RESULTS", port=results_port, may_send=False,
                                              receives_results=True)),
        )
        config.model = tiny_model(tmp_path / "tiny-model", width=32, layers=1)
        config.notifications = (f'\n[notifications]\ninclude_phi = {"true" if include_phi else "false"}\n'
                                f'backoff_seconds = [0.5]\n[[notifications.webhooks]]\nurl = "{hook.url}"\n')
        node = NodeProcess(config).start(timeout=120)
        try:
            image = small_instance(seed=11)
            image.PatientName, image.PatientID = f"{FAMILY}^{GIVEN}", PATIENT_ID
            image.AccessionNumber = "ACC-PHI-1"
            source = tmp_path / "in.dcm"
            if dirty:
                dirty_patient(image)
                with pydicom_config.disable_value_validation():
                    image.save_as(source, enforce_file_format=True)
            else:
                image.save_as(source, enforce_file_format=True)
            assert storescu(node.port, [source], calling="EDSCU").returncode == 0
            wait_for(lambda: len(hook.requests) >= 2 and any(received.iterdir()), 180,
                     "the webhook (after one 500) and the SR at storescp", 0.5)
        finally:
            node.stop(timeout=60)
            scp.terminate()
            scp.wait(30)

    log = node.log()
    assert "notification" in log and "EDSCU" in log  # the scan below read the run's real log
    assert phi_found(log) == [] and "ACC-PHI-1" not in log
    bodies = [body.decode() for _headers, body in hook.requests]
    # The accession number identifies the patient's visit: only with include_phi.
    assert all(("ACC-PHI-1" in body) == include_phi for body in bodies)
    found = sorted({token for body in bodies for token in phi_found(body)})
    if include_phi:
        assert found == sorted([FAMILY, GIVEN, PATIENT_ID])
    else:
        assert found == []
