"""``lumbar-node push PATH... --to AE@host:port``: C-STORE files and folders to a peer.

Files are sent byte for byte as stored (pynetdicom's chunked sending: no decoding, no
transcoding), so each file needs a presentation context for its own SOP class and
transfer syntax; these are requested from the file meta information. Folders are walked
recursively; files in them that are not DICOM are skipped (and listed), while a non-DICOM
file named on the command line counts as a failure. Exit status 0 only when every file
was stored with status success.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from node.commands.echo import parse_peer

DEFAULT_CALLING_AE = "LUMBARPUSH"
#: PS3.8: an association carries at most 128 presentation contexts
MAX_CONTEXTS = 128
EXIT_FAILED = 1
#: C-STORE warning statuses (stored, with coercion or discarded elements; PS3.4 B.2.3)
WARNING_LOW, WARNING_HIGH = 0xB000, 0xBFFF


@dataclass(frozen=True)
class PushItem:
    """One file to send and what its file meta says."""

    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass
class PushReport:
    """Per-file outcome of a push."""

    sent: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``push``."""
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="DICOM files or folders"
    )
    parser.add_argument("--to", required=True, type=parse_peer, help="AE@host:port of the receiver")
    parser.add_argument("--aet", default=DEFAULT_CALLING_AE, help="calling AE title")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="network/DIMSE timeout in seconds"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar; print failures only")


def _walk(paths: Sequence[Path]) -> Iterable[tuple[Path, bool]]:
    """(file, named explicitly) for each file under ``paths``, sorted within folders."""
    for path in paths:
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                yield child, False
        else:
            yield path, True


def collect(paths: Sequence[Path], report: PushReport) -> list[PushItem]:
    """Read the file meta of every file; record non-DICOM files in ``report``."""
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info

    items: list[PushItem] = []
    for path, explicit in _walk(paths):
        try:
            meta = read_file_meta_info(path)
            sop_class = str(meta.MediaStorageSOPClassUID)
            syntax = str(meta.TransferSyntaxUID)
        except OSError as exc:  # missing, unreadable: say so, not "not DICOM"
            reason = f"cannot read: {exc.strerror or exc}"
            (report.failed if explicit else report.skipped).append((path, reason))
            continue
        except (InvalidDicomError, AttributeError, ValueError, EOFError) as exc:
            reason = f"not a DICOM file ({type(exc).__name__})"
            (report.failed if explicit else report.skipped).append((path, reason))
            continue
        items.append(PushItem(path, sop_class, syntax))
    return items


def _batches(items: list[PushItem]) -> list[list[PushItem]]:
    """Split so that no batch needs more than MAX_CONTEXTS (SOP class, syntax) pairs."""
    batches: list[list[PushItem]] = []
    current: list[PushItem] = []
    pairs: set[tuple[str, str]] = set()
    for item in items:
        pair = (item.sop_class_uid, item.transfer_syntax_uid)
        if pair not in pairs and len(pairs) >= MAX_CONTEXTS:
            batches.append(current)
            current, pairs = [], set()
        pairs.add(pair)
        current.append(item)
    if current:
        batches.append(current)
    return batches


def run(args: argparse.Namespace) -> int:
    """Send everything; print one line per file; the exit status."""
    from pynetdicom import AE, _config
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from node.reactor import use_race_free_requestors

    _config.STORE_SEND_CHUNKED_DATASET = True
    use_race_free_requestors()
    # one line per file whatever the terminal width, and paths printed as they are (no markup)
    console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
    report = PushReport()
    items = collect(args.paths, report)
    peer = args.to
    progress = Progress(
        TextColumn("push"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=args.quiet,
    )
    with progress:
        task = progress.add_task("push", total=len(items))
        for batch in _batches(items):
            ae = AE(ae_title=args.aet)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
            for sop_class, syntax in sorted(
                {(i.sop_class_uid, i.transfer_syntax_uid) for i in batch}
            ):
                ae.add_requested_context(sop_class, [syntax])
            assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
            if not assoc.is_established:
                for item in batch:
                    report.failed.append((item.path, f"association with {peer} failed"))
                    progress.advance(task)
                continue
            sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                for item in batch:
                    _send_one(assoc, item, report)
                    if not args.quiet:
                        _print_last(console, report, item.path)
                    progress.advance(task)
            finally:
                if assoc.is_established:
                    assoc.release()
    for path, reason in report.skipped:
        console.print(f"SKIPPED {path}: {reason}")
    for path, reason in report.failed:
        if args.quiet or not any(i.path == path for i in items):
            console.print(f"FAILED  {path}: {reason}")
    print(
        f"pushed {len(report.sent)} file(s) to {peer}; {len(report.failed)} failed, {len(report.skipped)} skipped"
    )
    return EXIT_FAILED if report.failed else 0


def _send_one(assoc: object, item: PushItem, report: PushReport) -> None:
    from pynetdicom.association import Association

    assert isinstance(assoc, Association)
    if not assoc.is_established:
        report.failed.append((item.path, "association lost"))
        return
    try:
        status = assoc.send_c_store(item.path)
    except (ValueError, AttributeError, OSError, RuntimeError) as exc:
        report.failed.append((item.path, f"{type(exc).__name__}: {exc}"))
        return
    code = int(status.Status) if status is not None and "Status" in status else None
    if code == 0 or (code is not None and WARNING_LOW <= code <= WARNING_HIGH):
        report.sent.append(item.path)
    elif code is None:
        report.failed.append((item.path, "no response (timeout or abort)"))
    else:
        report.failed.append((item.path, f"status 0x{code:04X}"))


def _print_last(console: object, report: PushReport, path: Path) -> None:
    from rich.console import Console

    assert isinstance(console, Console)
    if report.sent and report.sent[-1] == path:
        console.print(f"OK      {path}")
    elif report.failed and report.failed[-1][0] == path:
        console.print(f"FAILED  {path}: {report.failed[-1][1]}")
