"""``lumbar-node evaluate --data DIR [--json]``: the pipeline's output against ground truth.

DIR holds phantom studies written by ``lumbar-node phantom`` (``truth.json`` +
``labels.npz`` + ``ax/`` per study) and/or real labelled cases in the format of
:mod:`ai.realdata`. Every series runs through the node's own path (``load_volume`` ->
``Analyzer``); segmentation metrics come from :mod:`ai.evaluate`, grade metrics from
:mod:`ai.evaluate_grades` when that module is present.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from node.commands.analysis_options import add_analysis_options, analysis_options

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, type=Path, help="folder of phantom studies or real cases"
    )
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    parser.add_argument(
        "--weights", type=Path, default=None,
        help="weights folder (default: shipped): each stage whose card it holds (segmentation "
        "model, canal refiner, column refiner; e.g. a `train` best/ folder) is taken from it, "
        "the others are the shipped ones",
    )
    add_analysis_options(parser)


#: ``Analyzer.segment`` timings summed into ``segmentation_ms_per_slice`` (every stage that
#: makes the label map: network, post-processing and both refiners).
SEGMENTATION_STAGES = ("pre_process", "predict", "post_process", "column_refine", "refine")


def phantom_cases(root: Path) -> Iterator[Any]:
    """EvalCases of every phantom study under ``root`` (axial series, slice-ordered truth)."""
    import numpy as np

    from ai.evaluate import EvalCase
    from node.volume_io import load_volume

    for truth_path in sorted(root.rglob("truth.json")):
        folder = truth_path.parent
        truth = json.loads(truth_path.read_text())
        files = sorted((folder / "ax").glob("*.dcm"))
        if not files or not (folder / "labels.npz").is_file():
            logger.warning("skipping %s: no ax/ series or labels.npz", folder)
            continue
        volume, _ = load_volume(files)
        index = {uid: k for k, uid in enumerate(volume.slice_uids)}
        with np.load(folder / "labels.npz") as z:
            labels = np.stack([z[uid] for uid in volume.slice_uids])
        by_uid = {s["sop_instance_uid"]: s for s in truth.get("slices", [])}
        slices = [by_uid.get(uid, {}) for uid in volume.slice_uids]
        levels = []
        for lv in truth.get("levels", []):
            entry = dict(lv)
            entry["slice_indices"] = sorted(
                index[u] for u in lv.get("slice_uids", []) if u in index
            )
            if lv.get("mid_disc_uid") in index:
                entry["mid_slice"] = index[lv["mid_disc_uid"]]
            levels.append(entry)
        yield EvalCase(
            name=folder.name,
            volume=volume,
            truth_labels=labels,
            truth={**truth, "slices": slices, "levels": levels},
            mode=str(truth.get("mode", "unknown")),
        )


def labelled_cases(root: Path) -> Iterator[Any]:
    """EvalCases under ``root``: phantom studies when it holds any, else real labelled cases."""
    from ai.realdata import iter_cases
    from node.volume_io import load_volume

    if any(root.rglob("truth.json")):
        yield from phantom_cases(root)
    else:
        yield from iter_cases(root, volume_loader=lambda paths: load_volume(paths))


def evaluate(data: Path, analyzer: Any) -> dict[str, Any]:
    """Run the analyzer on every case under ``data`` and compare with the truth."""
    from ai.evaluate import SegmentationMetrics, case_summary
    from ai.evaluate_levels import LevelAgreement, true_levels

    metrics = SegmentationMetrics()
    level_agreement = LevelAgreement()
    true_level_agreement = LevelAgreement()
    predicted: list[Any] = []
    truths: list[dict[str, Any]] = []
    names: list[str] = []
    per_case: list[dict[str, Any]] = []
    n_slices = 0
    seconds = 0.0
    for case in labelled_cases(data):
        result = analyzer.analyze(case.volume)
        metrics.add_case(case, result.labels)
        level_agreement.add_case(case, result.levels)
        true_level_agreement.add_case(case, true_levels(case, result.labels))
        predicted.append(result)
        truths.append(case.truth)
        names.append(case.name)
        per_case.append(case_summary(case, result.labels, len(result.flags)))
        n_slices += case.volume.n_slices
        seconds += sum(result.timings_s.get(k, 0.0) for k in SEGMENTATION_STAGES)
        logger.info("evaluated %s (%d slices)", case.name, case.volume.n_slices)
    report: dict[str, Any] = {
        "model": {"name": analyzer.card.name, "version": analyzer.card.version},
        "data": str(data),
        "cases": names,
        "n_slices": n_slices,
        "segmentation": metrics.report(),
        "level_measurements": level_agreement.report(),
        "level_measurements_true_slices": true_level_agreement.report(),
        "segmentation_ms_per_slice": round(1000 * seconds / n_slices, 1) if n_slices else None,
        "per_case": per_case,
    }
    try:
        from ai.evaluate_grades import evaluate_grades
    except ImportError:
        report["grades"] = None
    else:
        with_levels = [(p, t) for p, t in zip(predicted, truths, strict=True) if t.get("levels")]
        report["grades"] = (
            evaluate_grades([p for p, _ in with_levels], [t for _, t in with_levels])
            if with_levels
            else None
        )
    return report


def stage_dirs(weights: Path | None) -> dict[str, Path | None]:
    """Analyzer folders of the stages whose card a ``--weights`` folder holds (None: shipped).

    Raises ``FileNotFoundError`` when the folder holds no card at all, so a typo in the
    path is not silently evaluated as the shipped model.
    """
    from ai.canal_refine import CARD_FILE as CANAL_CARD
    from ai.card import CARD_FILE as SEG_CARD
    from ai.column_refine import CARD_FILE as COLUMN_CARD

    stages = {"weights_dir": SEG_CARD, "refiner_dir": CANAL_CARD, "column_dir": COLUMN_CARD}
    if weights is None:
        return dict.fromkeys(stages)
    found = {key: weights if (weights / card).is_file() else None for key, card in stages.items()}
    if not any(found.values()):
        raise FileNotFoundError(f"{weights} holds none of {sorted(stages.values())}")
    return found


def run(args: argparse.Namespace) -> int:
    from ai.evaluate import markdown_table, markdown_worst_cases
    from ai.evaluate_levels import markdown_level_table
    from ai.pipeline import Analyzer

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    dirs = stage_dirs(args.weights)
    analyzer = Analyzer(
        **analysis_options(args),
        weights_dir=dirs["weights_dir"], refiner_dir=dirs["refiner_dir"], column_dir=dirs["column_dir"],
    )
    report = evaluate(args.data, analyzer)
    if not report["cases"]:
        logger.error("no cases found under %s", args.data)
        return 2
    text = json.dumps(report, indent=2, default=str)
    if args.out is not None:
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print(
            f"{len(report['cases'])} series, {report['n_slices']} slices, model "
            f"{report['model']['name']} {report['model']['version']}"
        )
        for group in report["segmentation"]:
            print(f"\n## {group}\n")
            print(markdown_table(report["segmentation"], group))
        for group in report["level_measurements"]:
            print(f"\n## {group}: per-level measurements (results.json vs truth on the same slices)\n")
            print(markdown_level_table(report["level_measurements"], group))
        for group in report["level_measurements_true_slices"]:
            print(f"\n## {group}: per true level (prediction vs truth over the truth's disc slices)\n")
            print(markdown_level_table(report["level_measurements_true_slices"], group))
        print("\n## studies with the lowest mean Dice\n")
        print(markdown_worst_cases(report["per_case"]))
        if report.get("grades"):
            print("\n## grades\n")
            print(json.dumps(report["grades"], indent=2, default=str))
    return 0
