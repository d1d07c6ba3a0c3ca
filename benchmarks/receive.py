"""Receive throughput: DCMTK storescu -> msknode, against storescu -> DCMTK storescp and -> Orthanc, in the same run.

Two sets of instances (generated once into a cache directory):
  * CR  : 40 uncompressed 2500 x 2048 x 16-bit radiographs (~10 MB each),
  * J2K : 40 JPEG 2000 lossless DX radiographs of the same size (pydicom + pylibjpeg-openjpeg encoder).
Each round sends each set once to each receiver (the order rotates from round to round, fresh output
directories every time), timing storescu's wall clock (one association per set, TCP_NODELAY=1 in its
environment).

  storescp : ``storescp +xa -pdu 131072 -od DIR PORT`` (``+xa`` so it accepts JPEG 2000 too; ``-pdu 131072``,
             DCMTK's largest PDU, because msknode's default accepts any PDU size and storescp's default 16 KB
             PDUs would slow it down; ``--storescp-pdu 16384`` gives its default). It writes each file without
             fsync and keeps no index.
  Orthanc  : the Debian package's ``Orthanc`` (C-STORE SCP), its own storage and index directories, no plugins,
             every other option at Orthanc's default: ``SyncStorageArea`` true (each stored file fsynced),
             ``MaximumPduLength`` 16384, ``StorageCompression`` false, its built-in SQLite index. Skipped, with
             a note, where Orthanc is not installed (tests/setup/install_debian_tools.sh installs it).
  msknode  : ``msknode serve`` (receiver role only, SQLite index), durability on: every instance is
             fsynced, renamed, its directory fsynced and its index row committed (synchronous=FULL)
             before the success status.

Also measured: the serve process's peak RSS (VmHWM) while receiving one ~500 MB instance, to show the
dataset is streamed to disk rather than held in memory.

    .venv/bin/python benchmarks/receive.py [--rounds 3] [--count 40] [--skip-large]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_VERSION = "v1"
ROWS, COLUMNS = 2500, 2048
UNIQUE_IMAGES = 4  # distinct pixel arrays per set; instances cycle through them with their own UIDs
console = Console(width=None if sys.stdout.isatty() else 130)


# -- data ------------------------------------------------------------------------------------------
def radiograph(rows: int, columns: int, seed: int) -> np.ndarray:
    """Smooth anatomy-like structure plus noise: compresses about like a real radiograph (12 bits)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, rows, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, columns, dtype=np.float32)[None, :]
    tissue = np.exp(-(((x - 0.5) / 0.3) ** 2)) * 0.45
    bone = np.exp(-(((x - 0.5 - 0.05 * np.sin(6 * y + seed)) / 0.07) ** 2)) * 0.35
    image = 0.05 + tissue + bone + 0.02 * np.sin(30 * x + 4 * np.cos(20 * y))
    image = image + rng.normal(0.0, 0.008, size=(rows, columns)).astype(np.float32)
    return np.clip(image * 4095, 0, 4095).astype(np.uint16)


def make_dataset(pixels: np.ndarray, sop_class: str, modality: str, study_uid: str, series_uid: str,
                 number: int) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.PatientName, ds.PatientID = modality, "Bench^Receive", "BENCH"
    ds.StudyDate, ds.AccessionNumber, ds.SeriesNumber, ds.InstanceNumber = "20260101", "BENCH1", 1, number
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def build_set(directory: Path, kind: str, count: int, progress: Progress) -> list[Path]:
    """Generate (once) ``count`` instances of ``kind`` ('cr' or 'j2k') into ``directory``."""
    files = sorted(directory.glob("*.dcm"))
    if len(files) == count and (directory / "complete").exists():
        return files
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    task = progress.add_task(f"generating {count} {kind.upper()} instances", total=count)
    study_uid, series_uid = generate_uid(), generate_uid()
    encoded: dict[int, bytes] = {}
    for number in range(count):
        seed = number % UNIQUE_IMAGES
        pixels = radiograph(ROWS, COLUMNS, seed)
        if kind == "cr":
            ds = make_dataset(pixels, ComputedRadiographyImageStorage, "CR", study_uid, series_uid, number + 1)
        else:
            ds = make_dataset(pixels, DigitalXRayImageStorageForPresentation, "DX", study_uid, series_uid,
                              number + 1)
            if seed not in encoded:
                ds.compress(JPEG2000Lossless)
                encoded[seed] = ds.PixelData
            else:  # same pixels as an earlier instance: reuse its codestream (encoding is slow)
                ds.PixelData = encoded[seed]
                ds["PixelData"].VR = "OB"
                ds["PixelData"].is_undefined_length = True
                ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.save_as(directory / f"{kind}{number:03d}.dcm", enforce_file_format=True)
        progress.advance(task)
    (directory / "complete").touch()
    return sorted(directory.glob("*.dcm"))


def build_large(path: Path, megabytes: int) -> Path:
    """One uncompressed instance of about ``megabytes`` MB (a long, wide 16-bit image)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = 16384
    rows = megabytes * 1024 * 1024 // (columns * 2)
    tile = radiograph(1024, columns, 0)
    pixels = np.concatenate([tile] * (rows // 1024 + 1))[:rows]
    ds = make_dataset(pixels, ComputedRadiographyImageStorage, "CR", generate_uid(), generate_uid(), 1)
    partial = path.with_suffix(".part")
    ds.save_as(partial, enforce_file_format=True)
    partial.rename(path)
    return path


# -- peers -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_log(process: subprocess.Popen[bytes], log: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited ({process.returncode}):\n{log.read_text(errors='replace')}")
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} not logged within {timeout} s")


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited ({process.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port}")


@dataclass
class Peer:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    directory: Path
    http_port: int | None = None  # Orthanc's REST API

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def peak_rss_kb(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return -1


STORESCP_PDU = 131072  # set from --storescp-pdu


def start_storescp(directory: Path) -> Peer:
    out = directory / "out"
    out.mkdir(parents=True)
    port = free_port()
    process = subprocess.Popen(["storescp", "-aet", "STORESCP", "+xa", "-pdu", str(STORESCP_PDU), "-od", str(out),
                                str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, process)
    return Peer("storescp", port, process, out)


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)


def orthanc_version(binary: str) -> str:
    result = subprocess.run([binary, "--version"], capture_output=True, text=True)
    return (result.stdout or result.stderr).splitlines()[0].strip() if (result.stdout or result.stderr) else "?"


def start_orthanc(directory: Path) -> Peer:
    """Orthanc as a second C-STORE SCP: only what a benchmark needs is set, the rest is Orthanc's default."""
    binary = orthanc_binary()
    assert binary is not None
    directory.mkdir(parents=True)
    port, http_port = free_port(), free_port()
    config = directory / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(directory / "storage"), "IndexDirectory": str(directory / "index"),
        "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [],
    }))
    log = directory / "orthanc.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([binary, str(config)], stdout=handle, stderr=subprocess.STDOUT)
    wait_for_port(port, process)
    wait_for_port(http_port, process)
    return Peer("Orthanc", port, process, directory / "storage", http_port=http_port)


def count_orthanc_instances(peer: Peer) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{peer.http_port}/statistics", timeout=60) as response:
        return int(json.loads(response.read())["CountInstances"])


def start_msknode(directory: Path) -> Peer:
    directory.mkdir(parents=True)
    port = free_port()
    config = directory / "msknode.toml"
    config.write_text(f"""
[node]
ae_title = "MSKNODE"
host = "127.0.0.1"
port = {port}

[storage]
database_url = "sqlite:///{directory / 'msknode.db'}"
spool_dir = "{directory / 'spool'}"
min_free_disk_mb = 1024
fsync = true

[pipeline]
roles = ["receiver"]

[[peers]]
name = "bench"
ae_title = "STORESCU"
host = "127.0.0.1"
""")
    log = directory / "serve.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "node", "serve", "-c", str(config)], cwd=REPO_ROOT,
                                   stdout=handle, stderr=subprocess.STDOUT)
    wait_for_log(process, log, "listening as")
    return Peer("msknode", port, process, directory / "spool")


def send(peer: Peer, called: str, files: list[Path], flag: str | None) -> float:
    args = ["storescu", "-aet", "STORESCU", "-aec", called, "-to", "60", "-ta", "60", "-td", "120"]
    if flag:
        args.append(flag)
    args += ["127.0.0.1", str(peer.port), *map(str, files)]
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, TCP_NODELAY="1"))
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu -> {peer.name} failed: {(result.stdout + result.stderr)[-2000:]}")
    return elapsed


def count_msknode_rows(directory: Path) -> int:
    import sqlite3

    with sqlite3.connect(directory / "msknode.db") as connection:
        return int(connection.execute("SELECT count(*) FROM instances").fetchone()[0])


# -- main ------------------------------------------------------------------------------------------
def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    return (f"{os.cpu_count()} CPU ({cpu}), {memory:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, load average at start {load:.1f}")


def dcmtk_version() -> str:
    result = subprocess.run(["storescp", "--version"], capture_output=True, text=True)
    lines = (result.stdout or result.stderr).splitlines()
    return lines[0].strip() if lines else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "msknode-bench-cache")
    parser.add_argument("--work-dir", type=Path, default=None, help="where received files go (default: a temp dir)")
    parser.add_argument("--large-mb", type=int, default=500)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--storescp-pdu", type=int, default=131072,
                        help="storescp's maximum PDU (131072, DCMTK's largest, by default; 16384 is its default)")
    args = parser.parse_args()
    global STORESCP_PDU
    STORESCP_PDU = args.storescp_pdu

    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            console.print(f"[red]{tool} not installed (Debian package dcmtk)[/]")
            return 2
    receivers = ["storescp", "msknode"]
    orthanc = orthanc_binary()
    if orthanc is None:
        console.print("[yellow]Orthanc not installed (tests/setup/install_debian_tools.sh): not measured[/]")
    else:
        receivers.insert(1, "Orthanc")
    console.print(f"machine: {machine_description()}")
    console.print(f"storescp/storescu: {dcmtk_version()}" + (f"; {orthanc_version(orthanc)}" if orthanc else ""))
    console.print(f"receivers: storescp +xa -pdu {STORESCP_PDU} (no fsync, no index); "
                  + ("Orthanc with its default options, no plugins (SyncStorageArea true: files fsynced; "
                     "MaximumPduLength 16384; SQLite index); " if orthanc else "")
                  + "msknode serve, receiver role (fsync file, rename, fsync dir, index commit before Success)")
    cache = args.cache_dir / CACHE_VERSION
    with Progress(console=console) as progress:
        sets = {
            "CR uncompressed": (build_set(cache / f"cr{args.count}", "cr", args.count, progress), None),
            "DX J2K lossless": (build_set(cache / f"j2k{args.count}", "j2k", args.count, progress), "-xv"),
        }
    sizes = {name: sum(p.stat().st_size for p in files) for name, (files, _) in sets.items()}
    for name, (files, _) in sets.items():
        console.print(f"{name}: {len(files)} files, {sizes[name] / 1e6:.0f} MB")

    starters = {"storescp": start_storescp, "Orthanc": start_orthanc, "msknode": start_msknode}
    called_ae = {"storescp": "STORESCP", "Orthanc": "ORTHANC", "msknode": "MSKNODE"}
    work_root = Path(tempfile.mkdtemp(prefix="msknode-bench-", dir=args.work_dir))
    times: dict[tuple[str, str], list[float]] = {}
    started = time.monotonic()
    try:
        with Progress(console=console) as progress:
            task = progress.add_task("rounds", total=args.rounds * len(sets) * len(receivers))
            for round_number in range(args.rounds):
                for name, (files, flag) in sets.items():
                    # Rotate which receiver goes first so that none always meets a warm (or cold) page cache.
                    shift = round_number % len(receivers)
                    for receiver in receivers[shift:] + receivers[:shift]:
                        directory = work_root / f"r{round_number}-{receiver}-{name.split()[0]}"
                        peer = starters[receiver](directory)
                        try:
                            elapsed = send(peer, called_ae[receiver], files, flag)
                            stored = count_orthanc_instances(peer) if receiver == "Orthanc" else None
                        finally:
                            peer.stop()
                        if receiver == "msknode":
                            stored = count_msknode_rows(directory)
                        if stored is not None and stored != len(files):
                            raise RuntimeError(f"{receiver} indexed {stored} of {len(files)} instances")
                        times.setdefault((name, receiver), []).append(elapsed)
                        shutil.rmtree(directory, ignore_errors=True)
                        progress.advance(task)

        table = Table(title=f"storescu -> receiver, {args.rounds} rounds (median; min-max)")
        peers = [r for r in receivers if r != "msknode"]
        columns = ["set", "receiver", "seconds", "instances/s", "MB/s"] + [f"msknode/{p}" for p in peers]
        for column in columns:
            table.add_column(column, justify="right" if column != "set" else "left")
        ratios: dict[tuple[str, str], float] = {}
        for name, (files, _) in sets.items():
            medians = {r: statistics.median(times[(name, r)]) for r in receivers}
            for peer_name in peers:  # throughput ratio = inverse ratio of the times
                ratios[(name, peer_name)] = medians[peer_name] / medians["msknode"]
            for receiver in receivers:
                values = times[(name, receiver)]
                median = medians[receiver]
                cells = [f"{ratios[(name, p)]:.2f}x" if receiver == "msknode" else "" for p in peers]
                table.add_row(
                    name, receiver, f"{median:.2f} ({min(values):.2f}-{max(values):.2f})",
                    f"{len(files) / median:.1f}", f"{sizes[name] / 1e6 / median:.0f}", *cells,
                )
        console.print(table)
        for name in sets:
            console.print(f"{name}: throughput " + ", ".join(
                f"msknode/{p} {ratios[(name, p)]:.2f}x" for p in peers))
        console.print(f"rounds took {time.monotonic() - started:.0f} s; load average now {os.getloadavg()[0]:.1f}")

        if not args.skip_large:
            large = build_large(cache / f"large{args.large_mb}.dcm", args.large_mb)
            directory = work_root / "large-msknode"
            peer = start_msknode(directory)
            try:
                baseline = peer.peak_rss_kb()
                elapsed = send(peer, "MSKNODE", [large], None)
                peak = peer.peak_rss_kb()
            finally:
                peer.stop()
            size_mb = large.stat().st_size / 1e6
            console.print(
                f"one {size_mb:.0f} MB instance: {elapsed:.1f} s ({size_mb / elapsed:.0f} MB/s); msknode serve "
                f"peak RSS (VmHWM) {peak / 1024:.0f} MiB (after start-up: {baseline / 1024:.0f} MiB)"
            )
            shutil.rmtree(directory, ignore_errors=True)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
