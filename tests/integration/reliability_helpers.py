"""Helpers of the reliability tests (``test_reliability_*.py``): reading the node's index,
DCMTK ``storescu`` with per-file statuses, fast fake job stages run by the real node.

Fake stages
-----------
:func:`fake_stage_node_command` starts ``lumbar-node serve`` with the orchestrator's worker
running :class:`FakeStages` instead of the AI pipeline (the product's seam,
``node.orchestrator.Orchestrator(stages="module:callable")``); everything else (receiver,
series assembly, routing, job state machine, worker process, outbox, exporter) is the real
product. ``FakeStages`` writes one line per analysis to ``<state>/analyses.log`` (how many
times each series was analysed), can hold an analysis until ``<state>/release`` exists
(so a test can SIGKILL the node mid-analysis), and encodes results whose UIDs are derived
from the series UID (as the real encoders' are), so a re-run produces the same objects.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

STORESCU = "/usr/bin/storescu"
#: ``storescu -v`` prints this before each file...
_SENDING = re.compile(r"^I: Sending file: (.+)$")
#: ...and this after the peer's answer
_RESPONSE = re.compile(r"^I: Received Store Response \((.+?)\)")
#: how long a held analysis waits for the test to release it (s)
GATE_TIMEOUT_S = 120.0
GATE_POLL_S = 0.02


# -- the index ---------------------------------------------------------------------------


def query(state_dir: Path, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    """Rows of a read-only query on the node's index (safe while the node runs: WAL)."""
    conn = sqlite3.connect(f"file:{state_dir / 'index.sqlite'}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute(sql, tuple(params)))
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def indexed(state_dir: Path) -> dict[str, sqlite3.Row]:
    """SOP Instance UID -> ``instances`` row."""
    return {r["sop_instance_uid"]: r for r in query(state_dir, "SELECT * FROM instances")}


def intact(state_dir: Path, row: sqlite3.Row) -> bool:
    """True when the row's file exists and its bytes hash to the indexed sha256."""
    path = state_dir / row["path"]
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"]


# -- DCMTK storescu with per-file outcomes ---------------------------------------------------


def storescu_statuses(
    port: int, files: Sequence[Path], *, called_ae: str = "LUMBARNODE", calling_ae: str = "STORESCU",
    extra: Sequence[str] = (), timeout_s: float = 120.0,
) -> tuple[dict[Path, str], subprocess.CompletedProcess[str]]:
    """Run ``storescu -v`` on ``files``; each file's response text (``Success``...).

    Files without a response (the association died first) are absent from the dict.
    """
    args = [STORESCU, "-v", "-aet", calling_ae, "-aec", called_ae, *extra, "127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(
        args, env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    return parse_storescu(result.stdout + "\n" + result.stderr), result


def parse_storescu(text: str) -> dict[Path, str]:
    """File -> response text from ``storescu -v`` output."""
    out: dict[Path, str] = {}
    current: Path | None = None
    for line in text.splitlines():
        sending = _SENDING.match(line)
        if sending:
            current = Path(sending.group(1))
            continue
        response = _RESPONSE.match(line)
        if response and current is not None:
            out[current] = response.group(1)
            current = None
    return out


# -- the real node with fake job stages -----------------------------------------------------------

#: runs ``node.cli.main`` with the orchestrator's worker using the named stages class
_LAUNCHER = (
    "import sys\n"
    "import node.orchestrator as o, node.server as s\n"
    "def make(db, config):\n"
    "    return o.Orchestrator(db, config, stages='reliability_helpers:{stages}')\n"
    "s.make_orchestrator = make\n"
    "from node.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def fake_stage_node_command(stages: str = "FakeStages") -> list[str]:
    """argv prefix for ``serve`` with fake stages (needs this folder on ``PYTHONPATH``)."""
    return [sys.executable, "-c", _LAUNCHER.format(stages=stages)]


def pythonpath_with_helpers() -> str:
    """``PYTHONPATH`` that lets the spawned worker import this module."""
    here = str(Path(__file__).resolve().parent)
    current = os.environ.get("PYTHONPATH", "")
    return here + (os.pathsep + current if current else "")


def analyses(state_dir: Path) -> list[str]:
    """Series UIDs analysed by :class:`FakeStages`, one entry per finished analysis."""
    path = state_dir / "analyses.log"
    return path.read_text().split() if path.exists() else []


class FakeStages:
    """Fast job stages for the real node (see the module docstring)."""

    def __init__(self, config: Any) -> None:
        self.state_dir = Path(config.state_dir)

    def analyse(self, ctx: Any) -> Any:
        from node.worker import Analysis

        (self.state_dir / "analysing").write_text(ctx.job.series_instance_uid)
        hold = self.state_dir / "hold"
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while hold.exists() and not (self.state_dir / "release").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never released the analysis")
            time.sleep(GATE_POLL_S)
        sources = ctx.source_paths()
        with (self.state_dir / "analyses.log").open("a") as fh:
            fh.write(ctx.job.series_instance_uid + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return Analysis(volume=None, sources=sources, result=ctx.job.series_instance_uid)

    def encode(self, ctx: Any, analysis: Any) -> list[Dataset]:
        return [result_image(str(analysis.result), n) for n in range(2)]

    def export(self, ctx: Any, datasets: Sequence[Dataset]) -> None:
        from node.outbox import Outbox

        Outbox(ctx.db, ctx.config).add(ctx.job.series_instance_uid, datasets)


class DecodeOnlyStages:
    """The real first half of analysis (``node.volume_io``: decode, geometry, sorting) and
    no model: hostile input reaches the code that reads received files, quickly."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def analyse(self, ctx: Any) -> Any:
        import numpy as np

        from node.volume_io import load_volume
        from node.worker import Analysis

        volume, sources = load_volume(ctx.source_paths())
        if not np.all(np.isfinite(volume.pixels)):
            raise ValueError("decoded pixels are not finite")
        return Analysis(volume=volume, sources=list(sources), result=None)

    def encode(self, ctx: Any, analysis: Any) -> list[Dataset]:
        return []

    def export(self, ctx: Any, datasets: Sequence[Dataset]) -> None:
        return None


def derived_uid(series_uid: str, what: str) -> str:
    """A UID derived from the series UID (deterministic, like the real encoders')."""
    return str(generate_uid(entropy_srcs=[series_uid, what]))


def result_image(series_uid: str, number: int) -> Dataset:
    """A small Secondary Capture "overlay" result for ``series_uid``."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = derived_uid(series_uid, f"overlay-{number}")
    ds.StudyInstanceUID = derived_uid(series_uid, "study")
    ds.SeriesInstanceUID = derived_uid(series_uid, "overlay-series")
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.PatientName = "Reliability^Test"
    ds.PatientID = "REL-1"
    ds.InstanceNumber = number + 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(64)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


# -- a scripted PACS ------------------------------------------------------------------------------


class ScriptedPacs:
    """A pynetdicom storage SCP on 127.0.0.1 whose misbehaviour the test scripts.

    Attributes
    ----------
    stored
        SOP Instance UIDs answered with success, in order (a UID twice = sent twice).
    abort_first
        Abort the association instead of answering the first N C-STOREs.
    delay_first
        Wait ``delay_s`` before answering the first N C-STOREs (a slow PACS).
    hold
        While set, a C-STORE waits for it to clear (``entered`` is set when one waits).
    """

    def __init__(self, aet: str = "RELPACS") -> None:
        import threading

        from conftest import free_port
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        self.aet = aet
        self.stored: list[str] = []
        self.requests = 0
        self.abort_first = 0
        self.delay_first = 0
        self.delay_s = 0.0
        self.hold = threading.Event()
        self.entered = threading.Event()
        self._lock = threading.Lock()
        ae = AE(ae_title=aet)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
        ae.add_supported_context(Verification)
        self.port = free_port()
        server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        assert server is not None
        self.server = server

    def _on_store(self, event: Any) -> int:
        with self._lock:
            self.requests += 1
            number = self.requests
        if number <= self.abort_first:
            event.assoc.abort()
            return 0xA700
        if number <= self.delay_first:
            time.sleep(self.delay_s)
        if self.hold.is_set():
            self.entered.set()
            deadline = time.monotonic() + GATE_TIMEOUT_S
            while self.hold.is_set() and time.monotonic() < deadline:
                time.sleep(GATE_POLL_S)
        with self._lock:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def destination(self) -> dict[str, Any]:
        """The ``[[destinations]]`` entry pointing at this peer."""
        return {"name": "pacs", "ae_title": self.aet, "host": "127.0.0.1", "port": self.port}

    def stop(self) -> None:
        self.hold.clear()
        self.server.shutdown()
