"""The real analyse stage on real DICOM files (volume_io, results_io), with a fake analyser."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_mr_dataset
from pydicom import dcmread
from pydicom.uid import generate_uid

from ai.results import SeriesResult
from ai.volume import Volume
from node import jobs, series
from node.config import NodeConfig, load_config
from node.db import Database
from node.instances import InstanceRecord, insert_instance, summarize
from node.instances import ensure_schema as ensure_instances
from node.series import EchoGroup, Slice, assemble
from node.stages import DefaultStages, _subset_volume
from node.worker import Analysis, JobContext, process_one


class FakeAnalyzer:
    """Stands in for ``ai.pipeline.Analyzer``: an empty label map, counted constructions."""

    built = 0

    def __init__(self, **kwargs: Any) -> None:
        FakeAnalyzer.built += 1
        self.kwargs = kwargs

    def analyze(self, volume: Volume) -> SeriesResult:
        return SeriesResult(
            series_instance_uid=volume.series_instance_uid, model_name="fake", model_version="0",
            labels=np.zeros(volume.pixels.shape, dtype=np.uint8),
        )


class AnalyseOnly(DefaultStages):
    """The real analyse stage; encode and export do nothing."""

    def encode(self, ctx: JobContext, analysis: Analysis) -> Sequence[Any]:
        assert analysis.volume.n_slices == ctx.job.slices
        return []

    def export(self, ctx: JobContext, datasets: Sequence[Any]) -> None:
        return None


def _store_series(db: Database, config: NodeConfig, uid: str, echoes: Sequence[int]) -> list[InstanceRecord]:
    """Write real MR files (axial lumbar) into the spool and index them like the receiver."""
    records = []
    study = generate_uid()
    for echo in echoes:
        for i in range(4):
            ds = make_mr_dataset(study_uid=study, series_uid=uid, index=i, echo_number=echo)
            rel = f"spool/{ds.StudyInstanceUID}/{uid}/{ds.SOPInstanceUID}.dcm"
            (config.state_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(config.state_dir / rel, enforce_file_format=True)
            rec = InstanceRecord(
                sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=uid,
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=rel,
                sha256=hashlib.sha256((config.state_dir / rel).read_bytes()).hexdigest(),
                size_bytes=(config.state_dir / rel).stat().st_size, calling_ae="SCANNER", peer_address="127.0.0.1", received_at=time.time(),
                modality="MR", meta=summarize(dcmread(config.state_dir / rel, stop_before_pixels=True)),
            )
            insert_instance(db, rec)
            records.append(rec)
    assembly = assemble(records, config.routing)
    with db.transaction() as conn:
        jobs.upsert_for_completion(conn, series_uid=uid, study_uid=records[0].study_instance_uid,
                                   groups=assembly.groups, received_at=time.time(), now=time.time())
    return records


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    import ai.pipeline

    monkeypatch.setattr(ai.pipeline, "Analyzer", FakeAnalyzer)
    FakeAnalyzer.built = 0
    config = load_config(None, overrides={"node.state_dir": str(tmp_path / "state")})
    db = Database(config.index_path)
    ensure_instances(db)
    series.ensure_schema(db)
    jobs.ensure_schema(db)
    yield db, config
    db.close()


def test_analyse_writes_results_per_echo_group_and_loads_the_model_once(env: Any) -> None:
    db, config = env
    uid = generate_uid()
    _store_series(db, config, uid, echoes=[1, 2])
    stages = AnalyseOnly(config)
    first = process_one(db, config, stages)
    second = process_one(db, config, stages)
    assert first is not None and second is not None
    assert (first.state, second.state) == (jobs.DONE, jobs.DONE), (first.reason, second.reason)
    assert FakeAnalyzer.built == 1
    for echo in (1, 2):
        folder = config.results_dir / f"{uid}_e{echo}"
        payload = json.loads((folder / "results.json").read_text())
        assert payload["echo"] == echo and payload["series_instance_uid"] == uid
        labels = np.load(folder / "labels.npz")
        assert labels["labels"].shape[0] == 4 and len(labels["slice_uids"]) == 4
    assert not list(config.results_dir.glob("*.partial"))


def test_a_rerun_replaces_the_previous_results(env: Any) -> None:
    db, config = env
    uid = generate_uid()
    records = _store_series(db, config, uid, echoes=[1])
    stages = AnalyseOnly(config)
    assert process_one(db, config, stages).state == jobs.DONE  # type: ignore[union-attr]
    folder = config.results_dir / uid
    (folder / "stale.txt").write_text("from the first run")
    assembly = assemble(records, config.routing)
    with db.transaction() as conn:  # a late instance re-completed the series
        jobs.upsert_for_completion(conn, series_uid=uid, study_uid="1.2", groups=assembly.groups,
                                   received_at=0.0, now=time.time())
    again = process_one(db, config, stages)
    assert again is not None and again.state == jobs.DONE and again.generation == 2
    assert not (folder / "stale.txt").exists()
    assert json.loads((folder / "results.json").read_text())["job"]["generation"] == 2


def test_a_file_changed_since_it_was_acknowledged_fails_the_job_with_the_reason(env: Any) -> None:
    """The analysis reads only the bytes the node acknowledged: a spool file that no longer
    matches its indexed SHA-256 (disk fault, another program) fails the job visibly."""
    db, config = env
    uid = generate_uid()
    records = _store_series(db, config, uid, echoes=[1])
    hit = config.state_dir / records[2].path
    data = bytearray(hit.read_bytes())
    data[-1] ^= 0xFF  # one bit of one pixel
    hit.write_bytes(bytes(data))
    job = process_one(db, config, AnalyseOnly(config))
    assert job is not None and job.state == jobs.FAILED
    assert job.reason is not None and "1 of 4 received files are not the bytes that were acknowledged" in job.reason
    assert records[2].path in job.reason and FakeAnalyzer.built == 0


def test_subset_volume_keeps_one_echo_of_a_multi_frame_instance() -> None:
    n = 4
    volume = Volume(
        pixels=np.arange(n * 4, dtype=np.float32).reshape(n, 2, 2),
        pixel_spacing=(1.0, 1.0),
        positions=np.array([[0.0, 0.0, float(i // 2)] for i in range(n)]),
        orientations=np.tile([1.0, 0, 0, 0, 1.0, 0], (n, 1)),
        slice_uids=("1.2.3",) * n,
        series_instance_uid="1.2",
        frame_numbers=(1, 2, 3, 4),
    )
    group = EchoGroup(
        echo=2,
        slices=[Slice("1.2.3", f, (1, 0, 0, 0, 1, 0), (0, 0, 0), 90.0, 2, 2, (1.0, 1.0)) for f in (2, 4)],
        sop_instance_uids=["1.2.3"],
    )
    sub, sources = _subset_volume(volume, ["header"], group)
    assert sub.n_slices == 2 and sub.frame_numbers == (2, 4)
    assert np.array_equal(sub.pixels, volume.pixels[[1, 3]])
    assert sources == ["header"]


def test_warm_up_loads_the_model_and_imports_the_encoders(tmp_path: Path) -> None:
    """The first series after a start must not pay for the model load or the encoders'
    imports (about a second of highdicom): both happen before the worker says ready."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from node.config import load_config\n"
        "from node.stages import DefaultStages\n"
        f"cfg = load_config(None, overrides={{'node.state_dir': {str(tmp_path / 'state')!r}}})\n"
        "stages = DefaultStages(cfg)\n"
        "assert 'node.encode' not in sys.modules and 'highdicom' not in sys.modules\n"
        "stages.warm_up()\n"
        "assert stages._analyzer is not None\n"
        "assert 'node.encode' in sys.modules and 'highdicom' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
