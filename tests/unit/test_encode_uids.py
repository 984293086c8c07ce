"""Deterministic output identities: a re-analysis replaces instead of duplicating."""

from __future__ import annotations

import datetime as dt

import pytest
from encode_synthetic import make_series
from pydicom.uid import UID

from node.encode import encode_series, kind_of
from node.encode.uids import OutputIdentity, series_number


def test_same_input_same_uids_regardless_of_order() -> None:
    a = OutputIdentity.of("1.2.3", ["1.2.3.2", "1.2.3.1"], "1.0")
    b = OutputIdentity.of("1.2.3", ["1.2.3.1", "1.2.3.2", "1.2.3.1"], "1.0")
    for kind in ("seg", "sr", "overlay"):
        assert a.series_uid(kind) == b.series_uid(kind)
        assert a.instance_uid(kind, 3) == b.instance_uid(kind, 3)
        assert UID(a.series_uid(kind)).is_valid


def test_any_change_gives_new_uids() -> None:
    base = OutputIdentity.of("1.2.3", ["1.2.3.1", "1.2.3.2"], "1.0")
    others = [
        OutputIdentity.of("1.2.4", ["1.2.3.1", "1.2.3.2"], "1.0"),
        OutputIdentity.of("1.2.3", ["1.2.3.1"], "1.0"),
        OutputIdentity.of("1.2.3", ["1.2.3.1", "1.2.3.2"], "1.1"),
    ]
    for other in others:
        assert other.series_uid("seg") != base.series_uid("seg")
    uids = {base.series_uid(k) for k in ("seg", "sr", "overlay")}
    uids |= {base.instance_uid("overlay", i) for i in range(5)}
    assert len(uids) == 8


def test_invalid_identity_is_refused() -> None:
    with pytest.raises(ValueError, match="instance_uids"):
        OutputIdentity.of("1.2.3", [], "1.0")
    with pytest.raises(ValueError, match="kind"):
        OutputIdentity.of("1.2.3", ["1"], "1.0").series_uid("gsps")


def test_series_numbers_sort_after_the_source() -> None:
    assert series_number("seg", 5) < series_number("sr", 5) < series_number("overlay", 5)
    assert series_number("seg", None) == 1001


def test_encoding_twice_gives_identical_uids() -> None:
    s = make_series()
    first = encode_series(s.datasets, s.volume, s.result, now=dt.datetime(2026, 1, 1, 12))
    second = encode_series(s.datasets, s.volume, s.result, now=dt.datetime(2026, 2, 1, 12))
    key = [(kind_of(d), d.SeriesInstanceUID, d.SOPInstanceUID) for d in first.all()]
    assert key == [(kind_of(d), d.SeriesInstanceUID, d.SOPInstanceUID) for d in second.all()]
    assert [kind_of(d) for d in first.all()] == ["seg", "sr"] + ["overlay"] * (s.volume.n_slices + 1)
    assert len({d.SOPInstanceUID for d in first.all()}) == len(first.all())
    assert [d.SOPInstanceUID for d in first.of_kinds(["sr"])] == [first.sr.SOPInstanceUID]  # type: ignore[union-attr]


def test_a_new_version_of_any_contributing_model_gives_new_uids() -> None:
    """Same series, same segmentation model, but a retrained canal refiner: the outputs
    differ, so every UID must too (a PACS keeps the first object it got under a UID)."""
    import dataclasses

    s = make_series()
    seg = {"role": "segmentation", "name": s.result.model_name, "version": s.result.model_version}
    old = dataclasses.replace(
        s.result, models=[seg, {"role": "canal refinement", "name": "lumbar-canal-refiner", "version": "1.0.0"}]
    )
    new = dataclasses.replace(
        s.result, models=[seg, {"role": "canal refinement", "name": "lumbar-canal-refiner", "version": "1.1.0"}]
    )
    now = dt.datetime(2026, 1, 1, 12)
    first = {d.SOPInstanceUID for d in encode_series(s.datasets, s.volume, old, now=now).all()}
    second = {d.SOPInstanceUID for d in encode_series(s.datasets, s.volume, new, now=now).all()}
    assert first and not first & second
