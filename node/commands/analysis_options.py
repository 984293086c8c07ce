"""The analyser's command-line options, shared by ``analyze`` and ``evaluate``.

One definition, so the two commands run the pipeline the same way and default to what the
node's ``[ai]`` section does.
"""

from __future__ import annotations

import argparse
from typing import Any

from node.config import PRECISIONS, AiSection


def add_analysis_options(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--threads``, ``--precision`` and ``--mirror``."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=AiSection.precision,
        help="network arithmetic; auto: bfloat16 on CPUs with native bf16, float16 on CUDA",
    )
    parser.add_argument(
        "--mirror",
        action=argparse.BooleanOptionalAction,
        default=AiSection.mirror,
        help="average each slice's segmentation with that of its left-right mirror image "
        "(the node's [ai] mirror; --no-mirror: one forward pass)",
    )


def analysis_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`ai.pipeline.Analyzer` keyword arguments those options give."""
    return {
        "device": args.device,
        "threads": args.threads,
        "precision": args.precision,
        "mirror": args.mirror,
    }
