"""Shared helpers of the outbox and export unit tests: a config with destinations, tiny results."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.config import NodeConfig, load_config

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
SC = "1.2.840.10008.5.1.4.1.1.7"
MR = "1.2.840.10008.5.1.4.1.1.4"
SERIES = "1.2.826.0.1.3680043.8.498.100"


def make_config(tmp_path: Path, destinations: str, export: str = "") -> NodeConfig:
    text = f'[node]\nstate_dir = "{tmp_path / "state"}"\n[export]\n{export}\n{destinations}'
    path = tmp_path / "node.toml"
    path.write_text(text)
    return load_config(path)


PACS = '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n'
SEG_ONLY = (
    '[[destinations]]\nname = "segs"\nae_title = "SEGS"\nhost = "127.0.0.1"\nport = 4243\n'
    'kinds = ["seg"]\n'
)
NO_OVERLAY = (
    '[[destinations]]\nname = "web"\ntype = "stow"\nurl = "http://127.0.0.1:8042/dicom-web"\n'
    "overlay = false\n"
)


def result(sop_class: str, sop_uid: str | None = None, value: str = "A") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = value
    return ds
