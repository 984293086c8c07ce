"""``lumbar-node`` command line: parse, build one config object, hand over.

Each sub-command lives in ``node/commands/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily so that
``lumbar-node echo`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from ai.errors import InputError
from node import __version__
from node.errors import NodeError

#: Exit status when a command cannot do its work with the input it was given (a path that
#: does not exist, a file where a folder was expected, a weights folder without its card).
EXIT_INPUT = 2
#: Set to 1 to get the traceback of such an error instead of the one-line message.
TRACEBACK_ENV = "LUMBAR_NODE_TRACEBACK"

#: sub-command -> (module under node.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve", "run the DICOM node (receiver, scheduler, analysis, export)"),
    "check": ("check", "check the configuration, state directory, ports, models and destinations"),
    "echo": ("echo", "C-ECHO a peer: AE@host:port"),
    "push": ("push", "C-STORE files or folders to a peer: PATH --to AE@host:port"),
    "status": ("status", "queue, recent series, failures and deliveries, from the index"),
    "retry": ("jobs", "re-queue failed jobs or dead-lettered deliveries"),
    "reanalyze": ("jobs", "analyse done series again and re-send their results (after a model upgrade)"),
    "purge": ("jobs", "remove finished jobs (and optionally their files) from the index"),
    "analyze": ("analyze", "run the analysis offline on files or folders: PATH --out DIR"),
    "phantom": ("phantom", "write synthetic lumbar MR studies with exact ground truth"),
    "contact-sheet": ("phantom", "render slices of a phantom study with label overlays to PNG"),
    "train": ("train", "train the segmentation (and grading) model"),
    "evaluate": ("evaluate", "compare the pipeline's output with ground truth"),
    "calibrate": ("calibrate", "fit a segmentation model's logit offsets on labelled studies"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lumbar-node",
        description="DICOM node for lumbar spine MR: segmentation, measurements and stenosis grades.",
    )
    parser.add_argument("--version", action="version", version=f"lumbar-node {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = _load(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != f"node.commands.{module_name}":
                raise
            # not built yet: running it reports the missing module
            p.set_defaults(_module=module_name, _command=name)
            continue
        adder = getattr(module, f"add_{name.replace('-', '_')}_arguments", None)
        if adder is None:
            adder = module.add_arguments
        adder(p)
        p.set_defaults(_module=module_name, _command=name)
    return parser


def _load(module_name: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(f"node.commands.{module_name}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = _load(args._module)
    runner = getattr(module, f"run_{args._command.replace('-', '_')}", None)
    if runner is None:
        runner = module.run
    try:
        return int(runner(args))
    except (NodeError, InputError, OSError) as exc:
        # What the user can act on (their paths, permissions, the node's own refusals) is
        # one line naming the problem; a traceback would bury it. Bugs still raise.
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(f"lumbar-node {args._command}: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_INPUT


def describe_error(exc: BaseException) -> str:
    """One line for ``exc``: an OS error's reason and the path it concerns, else its message."""
    if isinstance(exc, OSError) and exc.strerror:
        paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
        return f"{exc.strerror}: {' -> '.join(paths)}" if paths else exc.strerror
    return str(exc) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
