"""Fuzz the C-STORE path of the real node with malformed data sets (hypothesis).

Each example is one new series: three good axial slices plus one hostile instance (or a
hostile series shape), sent byte for byte by a pynetdicom SCU to a real ``lumbar-node
serve`` whose worker runs the real ``node.volume_io`` (decode, geometry) without the model
(:class:`reliability_helpers.DecodeOnlyStages`). Every hostile input must get a failure
status at receipt, or its series must end as a ``failed`` / ``skipped`` job with a reason;
the node answers C-ECHO after every example, its memory stays bounded, and a good series
sent before and after the fuzzing is analysed normally.

Hostile inputs: truncated data sets, wrong VRs, huge/odd element lengths, zero-size and
oversized pixel data, wrong BitsAllocated, NaN/zero/negative PixelSpacing, broken
orientation, a one-slice series, mixed orientations, two slices at one position, and
compressed pixel data that does not decode.
"""

from __future__ import annotations

import random
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import conftest
import pytest
from conftest import SAGITTAL_IOP, NodeProcess, c_echo, make_mr_dataset, wait_until, write_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from reliability_helpers import fake_stage_node_command, pythonpath_with_helpers, query  # noqa: E402

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 120
GOOD_SLICES = 3
#: node memory may grow this much over the whole fuzz run (MB)
RSS_GROWTH_LIMIT_MB = 200.0
SETTLE_DEADLINE_S = 120.0
COMPRESSED = (JPEGBaseline8Bit, JPEG2000Lossless, RLELossless)
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, *COMPRESSED)
#: VRs whose explicit-VR length field is 4 bytes (after 2 reserved bytes)
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
#: statuses that refuse an instance at receipt (PS3.4 B.2.3)
FAILURES = {0xA700, 0xA900, 0xC000, 0x0122, 0x0110}
#: byte-level mutations may hit an unimportant element; semantic ones never give results
BYTE_LEVEL = ("truncate", "length", "vr")
SEMANTIC = (
    "pixels_empty", "pixels_short", "pixels_long", "bits_allocated", "spacing", "orientation",
    "rows_columns", "compressed_garbage", "one_slice", "mixed_orientation", "same_position",
)
MUTATIONS = BYTE_LEVEL + SEMANTIC


@dataclass
class Sent:
    mutation: str
    seed: int
    series_uid: str
    status: int | None


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conftest, "node_command", lambda: fake_stage_node_command("DecodeOnlyStages"))
        mp.setenv("PYTHONPATH", pythonpath_with_helpers())
        node = NodeProcess(tmp_path_factory.mktemp("fuzz-node"), {"series": {"quiet_seconds": 1.0}})
        node.start()
        try:
            yield node
        finally:
            node.stop()


@pytest.fixture(scope="module")
def lenient_writing() -> Iterator[None]:
    """Let pydicom write invalid values (NaN DS...) as they are."""
    previous = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    _config.STORE_SEND_CHUNKED_DATASET = True  # send files byte for byte, undecoded
    yield
    _config.STORE_SEND_CHUNKED_DATASET = False
    pydicom_config.settings.writing_validation_mode = previous


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# -- building hostile files ----------------------------------------------------------------


def dataset_offset(raw: bytes) -> int:
    """Where the data set starts after the preamble and the file meta group."""
    (meta_length,) = struct.unpack_from("<I", raw, 132 + 8)
    return 132 + 12 + int(meta_length)


def elements(raw: bytes, start: int) -> list[tuple[int, bytes, int, int]]:
    """(offset, VR, length offset, length size) of each top-level explicit-VR LE element."""
    out: list[tuple[int, bytes, int, int]] = []
    pos = start
    while pos + 8 <= len(raw):
        vr = raw[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", raw, pos + 8)
            out.append((pos, vr, pos + 8, 4))
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", raw, pos + 6)
            out.append((pos, vr, pos + 6, 2))
            pos += 8 + length
    return out


def byte_mutation(raw: bytes, mutation: str, rng: random.Random) -> bytes:
    start = dataset_offset(raw)
    data = bytearray(raw)
    if mutation == "truncate":
        return bytes(data[: rng.randrange(start, len(data))])
    offset, _vr, len_at, size = rng.choice(elements(raw, start))
    if mutation == "length":
        big = (1 << (8 * size)) - 1
        value = rng.choice([big, big - 15, big // 2, rng.randrange(0, big + 1), 1, 3])
        data[len_at : len_at + size] = value.to_bytes(size, "little")
    else:  # vr
        data[offset + 4 : offset + 6] = rng.choice([b"SQ", b"UN", b"OB", b"XX", b"\x00\x00", b"US", b"FD"])
    return bytes(data)


def semantic_mutation(ds: Dataset, mutation: str, rng: random.Random) -> str:
    """Break ``ds`` in place; return the transfer syntax to write it with."""
    if mutation == "pixels_empty":
        ds.PixelData = b""
    elif mutation == "pixels_short":
        ds.PixelData = ds.PixelData[: rng.randrange(0, len(ds.PixelData) - 1) & ~1]
    elif mutation == "pixels_long":
        ds.PixelData = ds.PixelData + bytes(rng.choice([2, 1024, 1 << 20]))
    elif mutation == "bits_allocated":
        ds.BitsAllocated = rng.choice([0, 1, 7, 12, 24, 32, 64])
        ds.BitsStored = rng.choice([ds.BitsAllocated, 16, 1])
    elif mutation == "spacing":
        ds.PixelSpacing = rng.choice([["nan", "nan"], ["0", "0"], ["-0.8", "0.8"], ["inf", "1"], ["0.8"], ["1e308", "1e308"]])
    elif mutation == "orientation":
        ds.ImageOrientationPatient = rng.choice([[0] * 6, [1, 0, 0, 1, 0, 0], ["nan"] * 6, [2, 0, 0, 0, 2, 0], [1, 0, 0]])
    elif mutation == "rows_columns":
        ds.Rows, ds.Columns = rng.choice([(0, 32), (32, 0), (65535, 65535), (16, 64), (33, 31)])
    elif mutation == "compressed_garbage":
        ts = rng.choice(COMPRESSED)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = encapsulate([rng.randbytes(rng.choice([2, 64, 2000]))])
        ds["PixelData"].VR = "OB"
        return str(ts)
    return str(ExplicitVRLittleEndian)


def build_case(folder: Path, mutation: str, seed: int) -> tuple[str, list[Path], Path | None]:
    """The series UID, the files to send in order, and which one is hostile (if one is)."""
    rng = random.Random(seed)
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)

    def slice_file(index: int, name: str, **options: object) -> Path:
        ds = make_mr_dataset(study_uid=study, series_uid=series, index=index, seed=seed, **options)  # type: ignore[arg-type]
        return write_dataset(ds, folder / name)

    if mutation == "one_slice":
        return series, [slice_file(0, "only.dcm")], None
    good = [slice_file(i, f"good{i}.dcm") for i in range(GOOD_SLICES)]
    if mutation == "mixed_orientation":
        return series, [*good, slice_file(GOOD_SLICES, "sag.dcm", orientation=SAGITTAL_IOP)], None
    if mutation == "same_position":
        return series, [*good, slice_file(1, "dup-position.dcm")], None
    ds = make_mr_dataset(study_uid=study, series_uid=series, index=GOOD_SLICES, seed=seed)
    hostile = folder / "hostile.dcm"
    if mutation in BYTE_LEVEL:
        write_dataset(ds, hostile)
        hostile.write_bytes(byte_mutation(hostile.read_bytes(), mutation, rng))
    else:
        write_dataset(ds, hostile, transfer_syntax=semantic_mutation(ds, mutation, rng))
    return series, [*good, hostile], hostile


def send(port: int, files: list[Path]) -> list[int | None]:
    ae = AE(ae_title="FUZZSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for ts in TRANSFER_SYNTAXES:
        ae.add_requested_context(MRImageStorage, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="LUMBARNODE")
    assert assoc.is_established, "the node refused an association during fuzzing"
    statuses: list[int | None] = []
    try:
        for path in files:
            try:
                rsp = assoc.send_c_store(path)
            except (ValueError, AttributeError, KeyError, OSError) as exc:  # the SCU could not read it
                raise AssertionError(f"test SCU failed to send {path.name}: {exc}") from exc
            statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def series_outcome(state_dir: Path, series_uid: str) -> tuple[str, str | None] | None:
    """(job state, reason) of the series' job(s), the worst first; None while not terminal."""
    rows = query(state_dir, "SELECT state, reason FROM jobs WHERE series_instance_uid = ?", (series_uid,))
    if not rows or any(r["state"] not in ("done", "failed", "skipped", "superseded") for r in rows):
        return None
    order = {"failed": 0, "skipped": 1, "superseded": 2, "done": 3}
    worst = min(rows, key=lambda r: order[r["state"]])
    return str(worst["state"]), worst["reason"]


# -- the test -------------------------------------------------------------------------------


def test_hostile_cstore_inputs(fuzz_node: NodeProcess, lenient_writing: None, tmp_path: Path) -> None:
    node = fuzz_node
    assert node.proc is not None
    control_before = build_case(tmp_path / "control-before", "none", 1)
    assert send(node.port, control_before[1]) == [0] * (GOOD_SLICES + 1)
    rss_start = rss_mb(node.proc.pid)
    rss_peak = rss_start
    sent: list[Sent] = []

    @settings(
        max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(mutation=st.sampled_from(MUTATIONS), seed=st.integers(0, 2**32 - 1))
    def one(mutation: str, seed: int) -> None:
        nonlocal rss_peak
        series_uid, files, hostile = build_case(tmp_path / f"case{len(sent)}", mutation, seed)
        statuses = send(node.port, files)
        assert all(s is not None for s in statuses), f"{mutation}: no C-STORE response: {statuses}"
        if hostile is not None:
            assert statuses[:-1] == [0] * GOOD_SLICES, f"{mutation}: good slices refused: {statuses}"
            assert statuses[-1] == 0 or statuses[-1] in FAILURES, f"{mutation}: status {statuses[-1]:#06x}"
        sent.append(Sent(mutation, seed, series_uid, statuses[-1]))
        assert node.running and c_echo(node.port) == 0, f"node down after {mutation} seed {seed}"
        rss_peak = max(rss_peak, rss_mb(node.proc.pid))  # type: ignore[union-attr]

    one()
    control_after = build_case(tmp_path / "control-after", "none", 2)
    assert send(node.port, control_after[1]) == [0] * (GOOD_SLICES + 1)

    # every series that received anything ends in a terminal job state
    stored = [s for s in sent if s.status == 0]
    pending = [s.series_uid for s in stored] + [control_before[0], control_after[0]]
    wait_until(lambda: all(series_outcome(node.state_dir, uid) is not None for uid in pending),
               SETTLE_DEADLINE_S, "every fuzzed series to end in a terminal job state")
    tally: dict[str, dict[str, int]] = {}
    violations: list[str] = []
    for case in sent:
        if case.status != 0:
            verdict = "refused at receipt"
        else:
            outcome = series_outcome(node.state_dir, case.series_uid)
            assert outcome is not None
            state, reason = outcome
            verdict = state
            if case.mutation in SEMANTIC and (state not in ("failed", "skipped") or not reason):
                violations.append(f"{case.mutation} seed {case.seed} ended {state} ({reason})")
        tally.setdefault(case.mutation, {}).setdefault(verdict, 0)
        tally[case.mutation][verdict] += 1
    for control in (control_before, control_after):
        assert series_outcome(node.state_dir, control[0]) == ("done", None), "a good series was affected"
    growth = rss_peak - rss_start
    print(f"fuzzed {len(sent)} inputs; node RSS {rss_start:.0f} -> peak {rss_peak:.0f} MB; outcomes:")  # noqa: T201
    for mutation in sorted(tally):
        print(f"  {mutation}: {tally[mutation]}")  # noqa: T201
    assert not violations, violations
    assert len(sent) >= MAX_EXAMPLES // 2
    assert growth < RSS_GROWTH_LIMIT_MB, f"node RSS grew {growth:.0f} MB"


