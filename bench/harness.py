"""Shared plumbing for the benchmarks: synthetic MR files, the real node process, DCMTK peers.

Everything runs on loopback. DCMTK ``storescp`` and Orthanc listen on every interface, so
:func:`isolated_network` moves the benchmark into a private network namespace (only ``lo``)
when the process may create one (root with iproute2); otherwise it says so and stays on
the host's loopback with random free ports. Every DCMTK process gets ``TCP_NODELAY=1``
(Debian's build leaves Nagle on otherwise: ~40 ms per message).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

# One implementation serves the tests and the benchmarks (run from the repository root):
# free ports, the private network namespace, and the TOML writer for node configs.
from tests.conftest import to_toml
from tests.integration.orthanc_peer import free_port
from tests.integration.orthanc_peer import isolated_network as isolated_network

logger = logging.getLogger(__name__)

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
#: how long a node or a peer may take to start answering (s)
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.05
#: DCMTK log layout with microsecond timestamps (``%s`` seconds, ``%Q`` ms.us)
DCMTK_LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%s.%Q} %m%n
"""
NODE_AE = "LUMBARNODE"


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK and Orthanc processes (Nagle off)."""
    return {**os.environ, "TCP_NODELAY": "1"}


# -- synthetic data ------------------------------------------------------------------------------


def mr_dataset(
    study_uid: str, series_uid: str, frame_uid: str, index: int, rows: int, columns: int, seed: int = 0
) -> Dataset:
    """One classic axial lumbar MR Image (16 bit, 12 stored, native), slice ``index`` (4 mm apart)."""
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = "MR"
    ds.PatientName = "Bench^Lumbar"
    ds.PatientID = "BENCH0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "BENCH1"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "BENCH"
    ds.SeriesNumber = 3
    ds.InstanceNumber = index + 1
    ds.BodyPartExamined = "LSPINE"
    ds.SeriesDescription = "t2_tse_tra lumbar"
    ds.ProtocolName = "t2_tse_tra lumbar"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.MRAcquisitionType = "2D"
    ds.EchoTime = 100.0
    ds.RepetitionTime = 4000.0
    ds.EchoNumbers = 1
    ds.SliceThickness = 4.0
    ds.PixelSpacing = [0.8, 0.8]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.ImagePositionPatient = [-100.0, -100.0, 4.0 * index]
    ds.SliceLocation = 4.0 * index
    ds.AcquisitionNumber = 1
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
    return ds


def write_series(folder: Path, count: int, rows: int = 256, columns: int = 256, study_uid: str | None = None) -> list[Path]:
    """Write ``count`` slices of one new MR series into ``folder`` (Part 10 files); the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    paths = []
    for i in range(count):
        ds = mr_dataset(study_uid, series_uid, frame_uid, i, rows, columns)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -- DCMTK ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendResult:
    """What one or more concurrent ``storescu`` runs did.

    ``latencies_ms`` are C-STORE response times seen by the sender (request sent ->
    response received, DCMTK's own log timestamps, microsecond resolution).
    """

    wall_s: float
    sent: int
    succeeded: int
    latencies_ms: list[float]
    errors: list[str]
    last_response_at: float | None = None

    @property
    def per_second(self) -> float:
        """Successful instances per second of wall time."""
        return self.succeeded / self.wall_s if self.wall_s > 0 else 0.0


def _stamp(line: str) -> float | None:
    head = line.split(" ", 1)[0]
    parts = head.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]) + int(parts[1]) / 1e3 + int(parts[2]) / 1e6


def parse_storescu_log(text: str) -> tuple[list[float], int, float | None]:
    """(response times in ms, successful responses, Unix time of the last response)."""
    latencies: list[float] = []
    succeeded = 0
    sent_at: float | None = None
    last: float | None = None
    for line in text.splitlines():
        stamp = _stamp(line)
        if stamp is None:
            continue
        if "Sending Store Request" in line:
            sent_at = stamp
        elif "Received Store Response" in line and sent_at is not None:
            latencies.append((stamp - sent_at) * 1e3)
            sent_at = None
            last = stamp
            if "(Success)" in line:
                succeeded += 1
    return latencies, succeeded, last


def storescu(
    port: int, called_ae: str, folders: Sequence[Path], workdir: Path, timeout_s: float = 300.0
) -> SendResult:
    """Push each folder with its own ``storescu`` process, all at once (one association each)."""
    log_config = workdir / "storescu-log.cfg"
    log_config.write_text(DCMTK_LOG_CONFIG)
    sent = sum(len(list(f.glob("*.dcm"))) for f in folders)
    procs = []
    started = time.perf_counter()
    for i, folder in enumerate(folders):
        args = [STORESCU, "-lc", str(log_config), "-aet", f"BENCH{i}", "-aec", called_ae, "+sd", "+r"]
        args += ["127.0.0.1", str(port), str(folder)]
        procs.append(subprocess.Popen(args, env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    latencies: list[float] = []
    succeeded = 0
    errors: list[str] = []
    last: float | None = None
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout_s)
        found, ok, stamp = parse_storescu_log(out)
        if stamp is not None:
            last = max(last or stamp, stamp)
        latencies.extend(found)
        succeeded += ok
        if proc.returncode != 0:
            errors.append(f"storescu exited {proc.returncode}: {out[-400:]}")
    wall = time.perf_counter() - started
    return SendResult(wall, sent, succeeded, latencies, errors, last)


class Storescp:
    """DCMTK ``storescp`` writing every instance to ``outdir`` (no fsync: DCMTK does not sync)."""

    def __init__(self, workdir: Path, fork: bool) -> None:
        self.port = free_port()
        self.ae_title = "REFSCP"
        self.outdir = workdir / "storescp-out"
        self.outdir.mkdir(parents=True, exist_ok=True)
        args = [STORESCP, "-aet", self.ae_title, "-od", str(self.outdir)]
        if fork:
            args.append("--fork")
        self.proc = subprocess.Popen(
            [*args, str(self.port)], env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_echo(self.port, self.ae_title, self.proc)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL at the deadline."""
        _terminate(self.proc)


def echo(port: int, called_ae: str) -> bool:
    """True when ``echoscu`` gets a successful C-ECHO from the peer."""
    result = subprocess.run(
        [ECHOSCU, "-to", "2", "-aet", "BENCHECHO", "-aec", called_ae, "127.0.0.1", str(port)],
        env=dcmtk_env(),
        capture_output=True,
        timeout=10,
        check=False,
    )
    return result.returncode == 0


def wait_for_echo(port: int, called_ae: str, proc: subprocess.Popen[Any], timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll with C-ECHO until the peer answers; raise if it exits or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while not echo(port, called_ae):
        if proc.poll() is not None:
            raise RuntimeError(f"{called_ae} exited with {proc.returncode} before answering C-ECHO")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{called_ae} did not answer C-ECHO within {timeout_s} s")
        time.sleep(POLL_S)


def _terminate(proc: subprocess.Popen[Any], timeout_s: float = STOP_TIMEOUT_S) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
    return int(proc.returncode)


# -- the node --------------------------------------------------------------------------------------


def node_command() -> list[str]:
    """How to start ``lumbar-node`` from this interpreter's environment."""
    script = Path(sys.executable).with_name("lumbar-node")
    return [str(script)] if script.exists() else [sys.executable, "-m", "node.cli"]


class NodeProcess:
    """A real ``lumbar-node serve`` process on free loopback ports, state under ``workdir``.

    ``sections`` are config sections merged over the benchmark defaults (a long quiet
    period, so that ingest runs are not followed by analysis unless asked for).
    """

    def __init__(self, workdir: Path, sections: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.http_port = free_port()
        self.state_dir = workdir / "state"
        merged: dict[str, Any] = {
            "node": {
                "host": "127.0.0.1",
                "port": self.port,
                "ae_title": NODE_AE,
                "state_dir": str(self.state_dir),
                "free_disk_floor_mb": 1,
                "drain_timeout_s": 10.0,
            },
            "http": {"host": "127.0.0.1", "port": self.http_port},
            "series": {"quiet_seconds": 3600.0},
            "logging": {"level": "WARNING"},
        }
        for name, body in (sections or {}).items():
            merged[name] = {**merged.get(name, {}), **body} if isinstance(body, Mapping) else body
        self.config_path = workdir / "node.toml"
        self.config_path.write_text(to_toml(merged))
        self.log_path = workdir / "node.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, prefix: Sequence[str] = ()) -> NodeProcess:
        """Start (optionally under a wrapper such as a profiler) and wait for C-ECHO."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*prefix, *node_command(), "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.env,
            )
        wait_for_echo(self.port, NODE_AE, self.proc)
        return self

    @property
    def pid(self) -> int:
        """The process id (after :meth:`start`)."""
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """CPU time (user + system, s) the node process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        """SIGTERM (drain), SIGKILL at the deadline; the exit status."""
        return _terminate(self.proc) if self.proc is not None else 0

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the node's log (for error messages)."""
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def health(self) -> dict[str, Any]:
        """The JSON of ``/healthz`` (empty when unreachable; 503 still has a body)."""
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5.0) as response:  # noqa: S310 - loopback
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read() or b"{}"))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            logger.warning("cannot read the node's health: %s", exc)
            return {}

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics``."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5.0) as response:  # noqa: S310 - loopback
                return str(response.read().decode())
        except (urllib.error.URLError, OSError) as exc:
            logger.warning("cannot read the node's metrics: %s", exc)
            return ""


def metric_value(text: str, name: str) -> float | None:
    """The (summed) value of metric ``name`` over its label sets in Prometheus text."""
    total: float | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key = line.split("{", 1)[0].split(" ", 1)[0]
        if key == name:
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, None when empty."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


# -- Orthanc as the PACS ---------------------------------------------------------------------------

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class Orthanc:
    """A real Orthanc (the PACS the node sends results to), storage under ``workdir``."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        config: dict[str, Any] = {
            "Name": "lumbar-node-bench-pacs",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "StableAge": 60,
            "SaveJobs": False,
        }
        path = workdir / "orthanc.json"
        import json

        path.write_text(json.dumps(config))
        with (workdir / "orthanc.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [ORTHANC, f"--logfile={workdir / 'orthanc-internal.log'}", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dcmtk_env(),
            )
        wait_for_echo(self.dicom_port, aet, self.proc)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL at the deadline."""
        _terminate(self.proc)
