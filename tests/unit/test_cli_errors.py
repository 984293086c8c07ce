"""The command line reports what the user gave wrong in one line, and bugs as tracebacks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from node import cli
from node.commands import analyze
from tests.conftest import write_mr_series


def test_missing_paths_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert cli.main(["analyze", str(missing), "--out", str(tmp_path / "out")]) == cli.EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert err == f"lumbar-node analyze: error: {missing} does not exist"
    assert cli.main(["evaluate", "--data", str(missing)]) == cli.EXIT_INPUT
    assert capsys.readouterr().err.strip() == f"lumbar-node evaluate: error: No such file or directory: {missing}"


def test_an_output_folder_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    series = write_mr_series(tmp_path / "series", 3)
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert cli.main(["analyze", str(series[0].parent), "--out", str(taken)]) == cli.EXIT_INPUT
    assert f"error: File exists: {taken}" in capsys.readouterr().err


def test_a_weights_folder_without_its_card(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    series = write_mr_series(tmp_path / "series", 3)
    empty = tmp_path / "weights"
    empty.mkdir()
    rc = cli.main(["analyze", str(series[0].parent), "--out", str(tmp_path / "out"), "--weights", str(empty)])
    assert rc == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert err.startswith("lumbar-node analyze: error: cannot read model card") and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_the_traceback_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["analyze", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])


def test_a_bug_is_not_dressed_as_an_input_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(files: object) -> object:
        raise KeyError("a bug")

    monkeypatch.setattr(analyze, "collect_files", broken)
    with pytest.raises(KeyError):
        cli.main(["analyze", str(tmp_path), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize(("tilt_deg", "analysed"), [(25.0, True), (40.0, False)])
def test_analyze_skips_what_the_node_would_not_call_axial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tilt_deg: float, analysed: bool
) -> None:
    """Offline and in the node one rule decides axial: a 25 degree L5-S1 block is analysed,
    a 40 degree oblique is skipped with the reason, and a run that analysed nothing says so."""
    t = math.radians(tilt_deg)
    series = write_mr_series(tmp_path / "series", 3, orientation=(1, 0, 0, 0, math.cos(t), -math.sin(t)))
    rc = cli.main(["analyze", str(series[0].parent), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    if analysed:
        assert rc == 0 and "1 of 1 series analysed, 0 skipped, 0 failed" in out
        assert len(list((tmp_path / "out").glob("*/results.json"))) == 1
    else:
        assert rc == analyze.EXIT_NOTHING_ANALYSED
        assert f"not axial: slice normal {tilt_deg:.1f} deg" in " ".join(out.split())
        assert "0 of 1 series analysed, 1 skipped, 0 failed" in out
