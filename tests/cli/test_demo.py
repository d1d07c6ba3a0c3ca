"""``msknode demo`` (node/demo/tour.py) with the knee MRI study (issue #17): the real node process, the real
throw-away PACS (Orthanc when installed, else the pynetdicom Storage SCP), the radiograph phantoms and one knee MRI
phantom study. The MRI study's SR, SEG and overlay SCs come back and the summary names the series chosen per plane,
the ones not used with their reasons, every finding with its probability and Present / Absent, the segments and
the priority with its reason. The 3-D model is the committed demo one when it is there, else a tiny random one, so
the test never waits on training; a model that config/msknode.toml names must load (no skip, CI or not).

Triage (issue #19): every study's printed priority follows from the values its SR prints, by the demo's rules (the
MAE's fracture / lytic / sclerotic heads at 0.5 first, then the KL and MRI rules); the worklist lists the studies
most urgent first; the demo's webhook receiver got a notification for every urgent study and for no other. With the
committed demo MAE (calibrated heads, models/README.md) the fracture and the lytic lesion are urgent, announced and
ahead of the normal knee in the worklist, and the normal knee is not urgent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engines.training.knee_mri_phantoms import default_protocol
from node.demo.tour import DEMO_MRI_MODEL, DEMO_STUDIES, MAE_TRIAGE_RULES, MRI_LABEL, REPO, mri_input_shape, run_demo
from node.results.knee_codes import FINDINGS, FINDINGS_BY_LABEL
from tests.helpers.models import tiny_orthodiffusion

CHOSEN = {"sagittal": "sag_pd_fs", "coronal": "cor_pd_fs", "axial": "ax_t2_fs"}
NOT_USED = ("localizer", "sag_t1")
PRIORITY_RANK = {"routine": 0, "high": 1, "urgent": 2}
SR_PERCENT = {  # MAE output (MAE_TRIAGE_RULES) -> the SR line giving its probability in percent, once per image
    "fracture": "Fracture probability",
    "lesion_lytic": "Probability of lytic (lesion)",
    "lesion_sclerotic": "Probability of sclerotic (lesion)",
}


def demo_output(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                mri_model: Path | None) -> tuple[int, str]:
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps at the terminal width; one summary item per line here
    code = run_demo(tmp_path / "work", timeout=420.0, mri_model=mri_model)
    return code, capsys.readouterr().out


def sections(out: str) -> dict[str, str]:
    """The demo's output cut at its rule lines (``──── title ────``), by title."""
    parts: dict[str, str] = {}
    title = ""
    for line in out.splitlines():
        if line.startswith("─"):
            title = line.strip("─ ")
            parts[title] = ""
        elif title:
            parts[title] += line + "\n"
    return parts


def expected_radiograph_priority(section: str) -> tuple[str, str] | None:
    """(priority, rule) the demo's rules give the study whose SR values ``section`` prints: the first rule that
    matches, the study's value being the highest over its images; None when a value is too close to a threshold
    for the printed digits to decide."""
    for name, output, threshold, priority in MAE_TRIAGE_RULES:
        values = [float(v) for v in re.findall(rf"(?m)^\s*{re.escape(SR_PERCENT[output])}: ([0-9.e+-]+)$", section)]
        assert values, (output, section)
        if any(abs(v - threshold * 100) < 0.01 for v in values):
            return None
        if max(values) >= threshold * 100:
            return priority, name
    if re.search(r"(?m)^\s*Kellgren-Lawrence grade: Kellgren-Lawrence grade 4$", section):
        return "high", "severe knee osteoarthritis"
    return "routine", "no triage rule matched"


def assert_triage_announced_and_ordered(out: str, labels: list[str]) -> None:
    """Each radiograph study's priority follows from its SR values; the SR says the same priority; the worklist
    lists every study, most urgent first, with the priority printed for it; the urgent studies, and only they,
    were announced to the demo's webhook with the rule that made them urgent."""
    parts = sections(out)
    printed: dict[str, tuple[str, str]] = {}
    for label in labels:
        section = parts[label]
        match = re.search(r"(?m)^priority: (routine|high|urgent) \((.+)\)$", section)
        assert match, (label, section)
        printed[label] = (match.group(1), match.group(2))
        assert f"AI triage priority: {match.group(1).capitalize()}" in section, label  # the SR's own item agrees
        if label != MRI_LABEL:
            expected = expected_radiograph_priority(section)
            assert expected is None or printed[label] == expected, (label, printed[label], expected)

    worklist_title = next(title for title in parts if title.startswith("Worklist"))
    rows = re.findall(r"(?m)^\d+\. (routine|high|urgent) +(.+) \((.+)\)$", parts[worklist_title])
    assert sorted(label for _, label, _ in rows) == sorted(labels), parts[worklist_title]
    assert [PRIORITY_RANK[p] for p, _, _ in rows] == sorted((PRIORITY_RANK[p] for p, _, _ in rows), reverse=True)
    assert all(printed[label] == (priority, reason) for priority, label, reason in rows), (rows, printed)

    notifications_title = next(title for title in parts if title.startswith("Notifications"))
    announced = re.findall(r"(?m)^notification received: (\w+) \((.+)\) for (.+)$", parts[notifications_title])
    urgent = {label: reason for label, (priority, reason) in printed.items() if priority == "urgent"}
    assert {label: rule for _, rule, label in announced} == urgent, (announced, printed)
    assert len(announced) == len(urgent) and all(priority == "urgent" for priority, _, _ in announced), announced
    if not urgent:
        assert "no notification: no study reached urgent" in parts[notifications_title]

    # What the demo is for: the committed model finds the planted findings and triage puts them first.
    assert printed["long bone with a fracture"][0] == "urgent", printed
    assert printed["knee with a lytic lesion"][0] == "urgent", printed
    assert printed["normal knee"][0] != "urgent", printed
    order = [label for _, label, _ in rows]
    assert order.index("normal knee") > max(order.index("long bone with a fracture"),
                                            order.index("knee with a lytic lesion")), order


def test_demo_sends_a_knee_mri_study_and_prints_its_selection_findings_segments_and_priority(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    demo_model = (DEMO_MRI_MODEL / "orthodiffusion.json").is_file()
    model = DEMO_MRI_MODEL if demo_model else tiny_orthodiffusion(tmp_path / "od-tiny")
    code, out = demo_output(capsys, monkeypatch, tmp_path, model)
    assert code == 0, out  # every study's results (the MRI's SR, SEG and SCs included) came back to the PACS
    assert "knee MRI: no demo 3-D model" not in out
    mri = sections(out)[MRI_LABEL]  # under its heading, up to the notifications

    size, depth = mri_input_shape(model)
    specs = {spec.name: spec for spec in default_protocol(size, depth)}
    for plane, name in CHOSEN.items():
        spec = specs[name]
        assert f"chosen for {plane}: series {spec.series_number} '{spec.description}' ({depth} slices)" in mri
    for name in NOT_USED:
        match = re.search(rf"not used: series {specs[name].series_number} '{re.escape(specs[name].description)}': "
                          r"(.+)", mri)
        assert match and match.group(1).strip() not in ("", "rejected"), name  # a reason, in words

    probabilities = {}
    for finding in FINDINGS:  # each label: its probability (NUM, %) and the finding Present / Absent
        value = re.search(rf"{re.escape(finding.probability.meaning)}: ([0-9.e+-]+)", mri)
        called = re.search(rf"{re.escape(finding.finding.meaning)}: (Present|Absent)", mri)
        assert value and called, finding.label
        probabilities[finding.label] = float(value.group(1))
        assert (probabilities[finding.label] >= 50) == (called.group(1) == "Present"), finding.label

    segments = re.search(r"segments: (.+)", mri)
    assert segments and segments.group(1).split(", ")[:3] == ["Femur", "Tibia", "Patella"]
    assert re.search(r"SEG '.+': \d+ segments", mri)
    renders = [Path(p) for p in re.findall(r"SC '.+': (\S+\.png)", mri)]
    assert renders and all(p.is_file() and p.stat().st_size > 0 for p in renders)

    # priority and why, as the demo config's triage rules decide it from the model's own probabilities
    if probabilities["ACL"] >= 50:
        assert "priority: urgent (knee MRI: ACL tear)" in mri
    elif probabilities["EFFU"] >= 50:
        assert "priority: high (knee MRI: joint effusion)" in mri
    else:
        assert "priority: routine (no triage rule matched)" in mri
    if demo_model:  # the trained demo model calls both planted findings (its model card: AUROC 1.0 on phantoms)
        for label in ("ACL", "EFFU"):
            assert f"{FINDINGS_BY_LABEL[label].finding.meaning}: Present" in mri, label

    assert_triage_announced_and_ordered(out, [label for label, _, _ in DEMO_STUDIES] + [MRI_LABEL])


def test_demo_without_a_3d_model_says_so_and_runs_the_radiographs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = demo_output(capsys, monkeypatch, tmp_path, tmp_path / "no-such-model")
    assert code == 0, out
    assert f"knee MRI: no demo 3-D model in {tmp_path / 'no-such-model'}; the radiographs only" in out
    assert MRI_LABEL not in out
    assert out.count("sent: ") == 3
    assert_triage_announced_and_ordered(out, [label for label, _, _ in DEMO_STUDIES])


def test_every_model_the_default_config_names_loads() -> None:
    """config/msknode.toml is what `make run` serves: a model it names that is missing or broken fails here, in CI
    as anywhere (no skip) — the knee MRI demo model included."""
    import engines
    from node.settings import load_settings

    settings = load_settings(REPO / "config" / "msknode.toml")
    entries = settings.model_entries
    assert entries
    for entry in entries:
        path = Path(entry.path) if Path(entry.path).is_absolute() else REPO / entry.path
        assert engines.load(str(path), backend="cpu") is not None, entry.name
