"""docs/conformance.md tells the truth: its SOP class and transfer syntax tables equal what
the receiver (node/receiver.py) and the exporter (node/senders.py) really negotiate."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom.uid import UID
from pynetdicom import AllStoragePresentationContexts

from node.config import Destination, load_config
from node.db import Database
from node.outbox import KIND_BY_SOP_CLASS, PRODUCED_SOP_CLASS
from node.receiver import IMAGE_SOP_CLASSES, TRANSFER_SYNTAXES, Receiver
from node.senders import DicomSender, export_contexts
from node.spool import Spool

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"
UID_RE = re.compile(r"\b1\.2\.840\.10008(?:\.\d+)+\b")
VERIFICATION = "1.2.840.10008.1.1"


def table(name: str) -> list[list[str]]:
    """Body rows (cells) of the markdown table after ``<!-- table: name -->``."""
    lines = DOC.read_text().splitlines()
    marker = f"<!-- table: {name} -->"
    assert marker in lines, f"{marker} missing from {DOC}"
    rows: list[list[str]] = []
    for line in lines[lines.index(marker) + 1 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    body = rows[2:]  # header and separator
    assert body, f"table {name} is empty"
    return body


def uid_and_name(rows: list[list[str]]) -> dict[str, str]:
    return {row[1]: row[0] for row in rows}


def test_scp_stored_sop_classes() -> None:
    documented = uid_and_name(table("scp-stored-sop-classes"))
    assert set(documented) == set(IMAGE_SOP_CLASSES)
    for uid, name in documented.items():
        assert name == UID(uid).name


def test_scp_transfer_syntaxes() -> None:
    documented = uid_and_name(table("scp-transfer-syntaxes"))
    assert set(documented) == set(TRANSFER_SYNTAXES)
    for uid, name in documented.items():
        assert name == UID(uid).name


def test_receiver_negotiates_every_storage_class_with_the_documented_syntaxes(tmp_path: Path) -> None:
    config_path = tmp_path / "node.toml"
    config_path.write_text(f'[node]\nstate_dir = "{tmp_path / "state"}"\n')
    config = load_config(config_path)
    receiver = Receiver(config, Database(config.index_path), Spool(config.state_dir))
    contexts = {str(cx.abstract_syntax): [str(ts) for ts in cx.transfer_syntax] for cx in receiver.ae.supported_contexts}
    storage = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    assert set(contexts) == storage | {VERIFICATION}
    assert set(IMAGE_SOP_CLASSES) <= storage
    for sop_class, syntaxes in contexts.items():
        expected = TRANSFER_SYNTAXES[:4] if sop_class == VERIFICATION else TRANSFER_SYNTAXES
        assert syntaxes == list(expected), sop_class


def test_scu_sop_classes_and_kinds() -> None:
    rows = table("scu-sop-classes")
    assert {row[1] for row in rows} == {sop for sop, _ in export_contexts()}
    for name, uid, kind, written in rows:
        assert name == UID(uid).name
        assert kind == f"`{KIND_BY_SOP_CLASS[uid].value}`"
        assert written == ("yes" if uid in PRODUCED_SOP_CLASS.values() else "no")


def test_scu_presentation_contexts_match_what_the_sender_requests() -> None:
    uid_by_name = {row[0]: row[1] for row in table("scu-sop-classes")}
    documented = sorted(
        (uid_by_name[row[0]], tuple(UID_RE.findall(row[1]))) for row in table("scu-presentation-contexts")
    )
    assert documented == sorted(export_contexts())

    config = load_config(None)
    destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)
    sender = DicomSender(destination, calling_ae=config.node.ae_title)
    requested = sorted(
        (str(cx.abstract_syntax), tuple(str(ts) for ts in cx.transfer_syntax))
        for cx in sender._application_entity().requested_contexts
    )
    assert requested == documented


@pytest.mark.parametrize("name", ["scp-stored-sop-classes", "scu-sop-classes"])
def test_documented_uids_are_well_formed(name: str) -> None:
    for row in table(name):
        assert UID(row[1]).is_valid and UID_RE.fullmatch(row[1])
