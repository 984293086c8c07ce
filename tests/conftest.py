"""Shared test fixtures and helpers (keep additions small and general).

Starting the real node
----------------------
``node_factory(**sections)`` starts ``lumbar-node serve --config <tmp toml>`` as a real
process on free loopback ports and returns a :class:`NodeProcess` once its listener answers an association request.
Keyword arguments are config sections merged over test defaults, e.g.
``node_factory(series={"quiet_seconds": 1.0}, node={"max_instances_per_series": 5})``.
Every node still running at the end of the test is stopped with SIGTERM (then SIGKILL).
``node`` is one default node. A node can be restarted on the same state and ports with
:meth:`NodeProcess.restart`.

DICOM data
----------
:func:`make_mr_dataset` / :func:`write_mr_series` build small classic MR images (axial
lumbar by default, 32x32, 16 bit) with consistent geometry; :func:`write_dataset` saves
any dataset with proper file meta. DCMTK tools are called by full path with
``TCP_NODELAY=1`` (:func:`dcmtk_env`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
#: how long a node may take to answer its first C-ECHO (s)
NODE_START_TIMEOUT_S = 60.0
#: how long a node may take to exit after SIGTERM (s)
NODE_STOP_TIMEOUT_S = 30.0
POLL_S = 0.1


# -- small utilities ------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now.

    All ``n`` sockets are bound before any is closed: two successive single picks can get
    the same port back from the kernel (a node then refuses http.port == node.port).
    """
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return free_ports(1)[0]


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: TCP_NODELAY=1 (else ~40 ms per message)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until true; fail the test with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """True when the peer closes (or resets) ``sock`` within ``within_s``; False if it stays open."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def listener_answers(port: int, called_ae: str = "LUMBARNODE", host: str = "127.0.0.1", timeout_s: float = 2.0) -> bool:
    """True when a DICOM listener answers an association request (accepted or rejected)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="TESTPROBE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if assoc.is_established:
        assoc.release()
        return True
    return bool(assoc.is_rejected)


def c_echo(port: int, called_ae: str = "LUMBARNODE", calling_ae: str = "TESTECHO", host: str = "127.0.0.1", timeout_s: float = 5.0) -> int | None:
    """C-ECHO a peer with pynetdicom; the status, or None when no association."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    return int(status.Status) if status is not None and "Status" in status else None


# -- DICOM data -------------------------------------------------------------------------------

AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL_IOP = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def make_mr_dataset(
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
    index: int = 0,
    rows: int = 32,
    columns: int = 32,
    orientation: Sequence[float] = AXIAL_IOP,
    spacing_mm: float = 4.0,
    pixel_spacing: tuple[float, float] = (0.8, 0.8),
    echo_number: int | None = 1,
    body_part: str = "LSPINE",
    description: str = "t2_tse_tra lumbar",
    series_number: int = 3,
    seed: int = 0,
) -> Dataset:
    """One classic MR Image (16 bit, native) at slice ``index`` of a parallel stack.

    Slices are ``spacing_mm`` apart along the normal of ``orientation``. Patient data
    are fake and constant.
    """
    iop = [float(v) for v in orientation]
    normal = np.cross(iop[:3], iop[3:])
    position = (np.array([-12.8, -12.8, 0.0]) + normal * spacing_mm * index).tolist()
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame-of-reference"])
    ds.Modality = "MR"
    ds.PatientName = "Test^Lumbar"
    ds.PatientID = "TEST0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "TEST"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = index + 1
    ds.BodyPartExamined = body_part
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.StudyDescription = "MR lumbar spine"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.EchoTime = 100.0
    ds.RepetitionTime = 4000.0
    if echo_number is not None:
        ds.EchoNumbers = echo_number
    ds.MagneticFieldStrength = 1.5
    ds.SliceThickness = spacing_mm
    ds.PixelSpacing = list(pixel_spacing)
    ds.ImageOrientationPatient = iop
    ds.ImagePositionPatient = position
    ds.SliceLocation = float(np.dot(position, normal))
    ds.AcquisitionNumber = 1
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed + index)
    ds.PixelData = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_dataset(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Save ``ds`` as a DICOM file (Part 10) with file meta; return ``path``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_mr_series(
    folder: Path,
    count: int = 5,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    **options: Any,
) -> list[Path]:
    """Write ``count`` slices of one MR series into ``folder``; return the file paths."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    return [
        write_dataset(
            make_mr_dataset(study_uid=study_uid, series_uid=series_uid, index=i, **options),
            folder / f"{series_uid[-12:]}_{i:04d}.dcm",
        )
        for i in range(count)
    ]


# -- the real node process ----------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(sections: Mapping[str, Any]) -> str:
    """A TOML document from ``{section: {key: value}}``; a list of dicts -> ``[[section]]``."""
    lines: list[str] = []
    for name, body in sections.items():
        if isinstance(body, list):
            for table in body:
                lines.append(f"[[{name}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
            continue
        lines.append(f"[{name}]")
        nested = {k: v for k, v in body.items() if isinstance(v, list) and v and isinstance(v[0], Mapping)}
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in body.items() if k not in nested)
        for key, tables in nested.items():
            for table in tables:
                lines.append(f"[[{name}.{key}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def node_command() -> list[str]:
    """How to run ``lumbar-node`` from this interpreter's environment."""
    script = Path(sys.executable).with_name("lumbar-node")
    return [str(script)] if script.exists() else [sys.executable, "-m", "node.cli"]


class NodeProcess:
    """A ``lumbar-node serve`` process with its config, state directory and log file."""

    def __init__(self, workdir: Path, sections: Mapping[str, Any]) -> None:
        self.workdir = workdir
        self.port, self.http_port = free_ports(2)
        self.state_dir = workdir / "state"
        self.ae_title = "LUMBARNODE"
        merged: dict[str, Any] = {
            "node": {
                "host": "127.0.0.1",
                "port": self.port,
                "ae_title": self.ae_title,
                "state_dir": str(self.state_dir),
                "free_disk_floor_mb": 1,
                "drain_timeout_s": 10.0,
            },
            "http": {"host": "127.0.0.1", "port": self.http_port},
            "series": {"quiet_seconds": 2.0},
            # most tests never analyse: load the model with the first job, not at start-up
            "ai": {"preload": False},
            "logging": {"level": "INFO"},
        }
        for name, body in sections.items():
            if isinstance(body, Mapping):
                merged[name] = {**merged.get(name, {}), **body}
            else:
                merged[name] = body
        self.port = int(merged["node"]["port"])
        self.http_port = int(merged["http"]["port"])
        self.ae_title = str(merged["node"]["ae_title"])
        self.config_path = workdir / "node.toml"
        self.config_path.write_text(to_toml(merged))
        self.log_path = workdir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = NODE_START_TIMEOUT_S) -> NodeProcess:
        """Start the process and wait until its listener answers (C-ECHO, or a policy rejection)."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*node_command(), "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while not listener_answers(self.port, self.ae_title):
            if self.proc.poll() is not None:
                pytest.fail(f"node exited with {self.proc.returncode} at start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"node did not answer C-ECHO within {timeout_s} s:\n{self.log_tail()}")
            time.sleep(POLL_S)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = NODE_STOP_TIMEOUT_S) -> int:
        """Send ``sig`` and wait for the exit status (SIGKILL at the deadline)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing drains."""
        self.stop(signal.SIGKILL)

    def restart(self) -> NodeProcess:
        """Start again on the same config, state and ports (after stop or kill)."""
        return self.start()

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the node logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the log (for failure messages)."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def http_get(self, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
        """GET ``path`` from the status endpoint: (HTTP status, body)."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout_s) as r:  # noqa: S310 - loopback test URL
                return int(r.status), r.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()

    def storescu(self, paths: Sequence[Path], *extra: str, calling_ae: str = "STORESCU", timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run DCMTK ``storescu`` against this node (``+sd +r`` for folders)."""
        args = [STORESCU, "-aet", calling_ae, "-aec", self.ae_title, *extra]
        if any(p.is_dir() for p in paths):
            args += ["+sd", "+r"]
        args += ["127.0.0.1", str(self.port), *map(str, paths)]
        return subprocess.run(args, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout_s, check=False)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start real node processes (see the module docstring); all are stopped at teardown."""
    started: list[NodeProcess] = []

    def factory(**sections: Any) -> NodeProcess:
        workdir = tmp_path / f"node{len(started)}"
        workdir.mkdir()
        node = NodeProcess(workdir, sections)
        started.append(node)
        return node.start()

    yield factory
    for node in started:
        if node.running:
            node.stop()


@pytest.fixture
def node(node_factory: Callable[..., NodeProcess]) -> NodeProcess:
    """One running node with the test defaults."""
    return node_factory()


#: real scans shared beside the repository (``../shared/data``): CI has them, a user's
#: clone may not. Never copied into the repository.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path of a shared real data set; skips when absent, except in CI where it fails."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"shared data {path} missing in CI")
        pytest.skip(f"shared data {path} not present in this checkout (CI has it)")
    return path


@pytest.fixture
def siemens_dual_echo() -> Path:
    """The real Siemens dual-echo TSE series (70 files, sagittal brain, 2 echoes)."""
    return shared_data("siemens-dual-echo-tse", "In", "Siemens", "VE11")
