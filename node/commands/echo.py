"""``lumbar-node echo AE@host:port``: C-ECHO a peer (exit 0 when it answers success).

Also home of :func:`parse_peer` (``AE@host:port``), shared with ``push``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

DEFAULT_CALLING_AE = "LUMBARECHO"

MAX_PORT = 65535
MAX_AE_LEN = 16


@dataclass(frozen=True)
class Peer:
    """A remote DICOM application entity."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_peer(text: str) -> Peer:
    """``AE@host:port`` (IPv6 hosts in brackets: ``AE@[::1]:11112``) -> :class:`Peer`."""
    ae, sep, rest = text.partition("@")
    host, colon, port_text = rest.rpartition(":")
    if not sep or not colon or not ae or not host:
        raise argparse.ArgumentTypeError(f"expected AE@host:port, got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number in {text!r}") from None
    if not 0 < port <= MAX_PORT or len(ae) > MAX_AE_LEN:
        raise argparse.ArgumentTypeError(f"bad AE title or port in {text!r}")
    return Peer(ae, host.strip("[]"), port)


#: exit status when the peer cannot be reached or does not answer success
EXIT_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``echo``."""
    parser.add_argument("peer", type=parse_peer, help="AE@host:port")
    parser.add_argument("--aet", default=DEFAULT_CALLING_AE, help="calling AE title")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each step")


class NoAssociation(Exception):
    """The peer rejected, aborted or never answered the association."""


def c_echo(peer: Peer, calling_ae: str = DEFAULT_CALLING_AE, timeout_s: float = 10.0) -> int | None:
    """Associate, send C-ECHO, release: the peer's status (None when it sent none).

    Raises :class:`NoAssociation` when no association was established.
    """
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from node.reactor import use_race_free_requestors

    use_race_free_requestors()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise NoAssociation(f"{peer}: association failed (rejected, aborted or unreachable)")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    return int(status.Status) if status and "Status" in status else None


def run(args: argparse.Namespace) -> int:
    """C-ECHO the peer; print the result."""
    peer = args.peer
    try:
        code = c_echo(peer, args.aet, args.timeout)
    except NoAssociation as exc:
        print(f"echo {exc}", file=sys.stderr)
        return EXIT_FAILED
    if code != 0:
        print(f"echo {peer}: status {code if code is None else hex(code)}", file=sys.stderr)
        return EXIT_FAILED
    print(f"echo {peer}: success")
    return 0
