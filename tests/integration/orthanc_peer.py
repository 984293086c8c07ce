"""A real Orthanc (Debian ``Orthanc`` 1.10 + DICOMweb plugin) as the PACS in tests, a
private network namespace so that it (it listens on every interface) stays unreachable, and
a SOP-class policy gateway in front of it for the "PACS refuses SR" scenario.

Orthanc 1.10.1 cannot refuse one SOP class: it accepts every storage class DCMTK knows
(``AcceptedSopClasses`` came later), and its ``ReceivedCStoreInstanceFilter`` Lua callback
discards an instance while answering success (a bug in that version; an error in the
callback answers 0xA700, out of resources). :class:`RefusingGateway` is a pynetdicom
storage SCP that does not accept Comprehensive 3D SR (or answers it with 0x0122) and
forwards everything else to Orthanc, so the refusal is real and the rest lands in Orthanc.

:func:`isolated_network` moves the calling thread (the test's main thread) into a fresh
network namespace holding only ``lo``; every thread and process started from it while
inside (Orthanc, pynetdicom associations, the node) shares it. Without the privilege to
make one (not root), tests run in the normal namespace on loopback ports and say so.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

try:  # under pytest: the tests folder is on sys.path
    from conftest import free_port, free_ports
except ModuleNotFoundError:  # imported by bench/ (python -m bench.run) from the repository root
    from tests.conftest import free_port, free_ports

logger = logging.getLogger(__name__)

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
CLONE_NEWNET = 0x40000000
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
POLL_S = 0.1

def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@contextmanager
def isolated_network() -> Iterator[bool]:
    """Run the body in a private network namespace; yields whether isolation worked."""
    name = f"lnode-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ip = shutil.which("ip")
    original = "/proc/thread-self/ns/net"
    saved = os.open(original, os.O_RDONLY)
    created = False
    try:
        if ip is None:
            raise OSError("iproute2 'ip' not found")
        subprocess.run([ip, "netns", "add", name], check=True, capture_output=True)
        created = True
        subprocess.run(
            [ip, "netns", "exec", name, ip, "link", "set", "lo", "up"], check=True, capture_output=True
        )
        _setns(f"/var/run/netns/{name}")
    except (OSError, subprocess.CalledProcessError) as exc:
        logger.warning("no private network namespace (%s): using the host's loopback", exc)
        if created and ip is not None:
            subprocess.run([ip, "netns", "del", name], check=False, capture_output=True)
        os.close(saved)
        yield False
        return
    try:
        yield True
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns(saved, CLONE_NEWNET)
        os.close(saved)
        subprocess.run([ip, "netns", "del", name], check=False, capture_output=True)


class Orthanc:
    """One Orthanc process with its own configuration and storage under ``workdir``.

    Parameters
    ----------
    workdir
        Holds the JSON configuration, the storage and index directories and the log.
    modalities
        ``DicomModalities`` entries (name -> [AE, host, port]).
    """

    def __init__(
        self,
        workdir: Path,
        aet: str = "ORTHANC",
        modalities: dict[str, list[Any]] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port, self.http_port = free_ports(2)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "orthanc.log"
        config: dict[str, Any] = {
            "Name": "lumbar-node-test-pacs",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomModalities": modalities or {},
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 2,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
        }
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> None:
        """Start and wait until ``GET /system`` answers (raises after the deadline)."""
        env = dict(os.environ, TCP_NODELAY="1")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - fixed argv
                [ORTHANC, f"--logfile={self.workdir / 'orthanc-internal.log'}", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {self.tail()}")
            try:
                if requests.get(f"{self.url}/system", timeout=1.0).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(POLL_S)
        raise TimeoutError(f"Orthanc not ready after {READY_TIMEOUT_S} s: {self.tail()}")

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM (or SIGKILL when not ``graceful``) and wait for the exit."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        self.process = None

    def tail(self, chars: int = 2000) -> str:
        text = ""
        for path in (self.log_path, self.workdir / "orthanc-internal.log"):
            if path.is_file():
                text += path.read_text(errors="replace")
            elif path.is_dir():
                for file in sorted(path.iterdir()):
                    text += file.read_text(errors="replace")
        return text[-chars:]

    # -- REST --
    def get(self, path: str) -> Any:
        response = requests.get(f"{self.url}{path}", timeout=10.0)
        response.raise_for_status()
        return response.json()

    def instance_tags(self) -> dict[str, dict[str, Any]]:
        """SOP Instance UID -> simplified main tags of every stored instance."""
        out: dict[str, dict[str, Any]] = {}
        for orthanc_id in self.get("/instances"):
            tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
            out[str(tags["SOPInstanceUID"])] = tags
        return out

    def new_instance_events(self) -> int:
        """How many times Orthanc stored a new instance (``/changes``), to catch duplicates."""
        changes = self.get("/changes?limit=10000")
        return sum(1 for c in changes["Changes"] if c["ChangeType"] == "NewInstance")


#: Comprehensive 3D SR Storage
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
#: status for a refused SOP class (PS3.4 B.2.3)
SOP_CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110


class RefusingGateway:
    """A storage SCP on 127.0.0.1 that refuses SR and forwards other instances to Orthanc.

    Parameters
    ----------
    target
        The Orthanc that receives what the gateway accepts.
    mode
        ``"no-context"``: the SR presentation context is rejected at association time;
        ``"status"``: it is accepted and every SR C-STORE is answered 0x0122.
    """

    def __init__(self, target: Orthanc, mode: str = "no-context", aet: str = "PACSGW") -> None:
        if mode not in ("no-context", "status"):
            raise ValueError(f"mode must be no-context or status, got {mode!r}")
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.target = target
        self.mode = mode
        self.aet = aet
        self.port = free_port()
        self.ae = AE(ae_title=aet)
        for cx in AllStoragePresentationContexts:
            if mode == "status" or cx.abstract_syntax != SR_CLASS:
                self.ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
        self.ae.add_supported_context(Verification)
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: Any) -> int:
        from pynetdicom import AE

        ds = event.dataset
        ds.file_meta = event.file_meta
        if str(ds.SOPClassUID) == SR_CLASS:
            return SOP_CLASS_NOT_SUPPORTED
        scu = AE(ae_title=self.aet)
        scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = scu.associate("127.0.0.1", self.target.dicom_port, ae_title=self.target.aet)
        if not assoc.is_established:
            return PROCESSING_FAILURE
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        return int(getattr(status, "Status", PROCESSING_FAILURE))

    def stop(self) -> None:
        self.server.shutdown()


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
