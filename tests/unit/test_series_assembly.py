"""Geometry coherence and echo split of a complete series (pure assembly, no timers)."""

from __future__ import annotations

from series_samples import AXIAL, SAGITTAL, record, stack, tilted

from node.config import RoutingSection
from node.series import COMPLETE, INCOHERENT, SKIPPED, WHOLE_SERIES, assemble

RULES = RoutingSection()


def test_plain_axial_stack_is_one_coherent_group() -> None:
    assembly = assemble(stack(12), RULES)
    (g,) = assembly.groups
    assert g.echo == WHOLE_SERIES and g.coherent and len(g.slices) == 12
    assert assembly.state == COMPLETE and assembly.reason is None
    assert g.blocks[0]["plane"] == "axial" and g.blocks[0]["slices"] == 12


def test_angled_blocks_one_per_disc_are_coherent() -> None:
    records = (
        stack(5, iop=tilted(-12.0), start=0, z0=0.0)
        + stack(5, iop=tilted(0.0), start=10, z0=40.0)
        + stack(5, iop=tilted(15.0), start=20, z0=80.0)
    )
    assembly = assemble(records, RULES)
    (g,) = assembly.groups
    assert g.coherent, g.reason
    assert len(g.blocks) == 3
    assert sorted(b["tilt_deg"] for b in g.blocks) == [0.0, 12.0, 15.0]
    assert assembly.state == COMPLETE


def test_mixed_sagittal_and_axial_is_incoherent() -> None:
    records = stack(5, iop=SAGITTAL) + stack(5, iop=AXIAL, start=10)
    assembly = assemble(records, RULES)
    (g,) = assembly.groups
    assert not g.coherent
    assert "mixed orientations" in (g.reason or "")
    assert "axial" in (g.reason or "") and "sagittal" in (g.reason or "")
    assert assembly.state == INCOHERENT
    assert "incoherent geometry" in (assembly.reason or "")


def test_angled_block_beyond_the_axial_tolerance_is_incoherent() -> None:
    records = stack(5, iop=tilted(0.0)) + stack(5, iop=tilted(35.0), start=10, z0=40.0)
    (g,) = assemble(records, RULES).groups
    assert not g.coherent and "mixed orientations" in (g.reason or "")


def test_duplicate_position_in_a_block_is_incoherent() -> None:
    records = stack(6)
    records.append(record("1.2.3.99", ipp=records[2].image_position and tuple(records[2].image_position)))
    (g,) = assemble(records, RULES).groups
    assert not g.coherent
    assert "duplicate slice position" in (g.reason or "")
    assert "1.2.3.99" in (g.reason or "") and "1.2.3.2" in (g.reason or "")


def test_several_matrices_or_spacings_are_incoherent() -> None:
    records = stack(4) + stack(2, start=10, z0=100.0, Rows=256, Columns=256)
    (g,) = assemble(records, RULES).groups
    assert not g.coherent and "matrices" in (g.reason or "")
    records = stack(4) + stack(2, start=10, z0=100.0, PixelSpacing=[0.9, 0.9])
    (g,) = assemble(records, RULES).groups
    assert not g.coherent and "pixel spacings" in (g.reason or "")


def test_missing_geometry_is_incoherent() -> None:
    (g,) = assemble([record("1.2.3.1", iop=None, ipp=None)], RULES).groups
    assert not g.coherent and "no patient geometry" in (g.reason or "")


def test_multi_echo_series_splits_into_echo_groups() -> None:
    records = stack(5, EchoNumbers=1) + stack(5, start=10, EchoNumbers=2)
    assembly = assemble(records, RULES)
    assert [g.echo for g in assembly.groups] == [1, 2]
    for g in assembly.groups:
        # same positions in both echoes are not duplicates: each echo is its own volume
        assert g.coherent, g.reason
        assert len(g.slices) == 5
        assert set(g.sop_instance_uids).isdisjoint(
            {u for o in assembly.groups if o is not g for u in o.sop_instance_uids}
        )
    assert assembly.state == COMPLETE


def test_echo_numbers_as_text_are_understood() -> None:
    records = stack(3, EchoNumbers="1") + stack(3, start=10, EchoNumbers=["2"])
    assert [g.echo for g in assemble(records, RULES).groups] == [1, 2]


def test_enhanced_multi_echo_frames_split_by_echo_time() -> None:
    frames = [
        {"iop": list(AXIAL), "ipp": [0.0, 0.0, 4.0 * (i // 2)], "echo": 12.0 if i % 2 else 95.0}
        for i in range(8)
    ]
    rec = record("1.2.3.7", iop=None, ipp=None, NumberOfFrames=8, frames=frames)
    assembly = assemble([rec], RULES)
    assert [g.echo for g in assembly.groups] == [1, 2]
    short, long_ = assembly.groups
    assert [s.frame for s in short.slices] == [2, 4, 6, 8]
    assert [s.frame for s in long_.slices] == [1, 3, 5, 7]
    assert all(g.coherent for g in assembly.groups)


def test_skipped_series_keeps_every_group_reason() -> None:
    records = stack(4, iop=SAGITTAL, BodyPartExamined="BRAIN", EchoNumbers=1) + stack(
        4, iop=SAGITTAL, start=10, BodyPartExamined="BRAIN", EchoNumbers=2
    )
    assembly = assemble(records, RULES)
    assert assembly.state == SKIPPED
    reason = assembly.reason or ""
    assert reason.startswith("echo 1: not axial") and "| echo 2: not axial" in reason
    assert "not lumbar: BodyPartExamined 'BRAIN'" in reason
