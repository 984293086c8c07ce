"""``lumbar-node serve``: run the DICOM node until SIGTERM.

The configuration is read and validated before anything opens a port; an invalid one
prints ``configuration error: <dotted.key>: <why>`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

#: exit status for an invalid configuration or a failed start-up
EXIT_CONFIG = 2
EXIT_STARTUP = 3
#: environment variable naming the config file when --config is not given
CONFIG_ENV = "LUMBAR_NODE_CONFIG"

#: command-line flag dest -> dotted configuration key
FLAG_KEYS: dict[str, str] = {
    "ae_title": "node.ae_title",
    "host": "node.host",
    "port": "node.port",
    "state_dir": "node.state_dir",
    "http_host": "http.host",
    "http_port": "http.port",
    "log_format": "logging.format",
    "log_level": "logging.level",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``serve`` (each overrides the file and the environment)."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"TOML configuration file (default: ${CONFIG_ENV}, else built-in defaults)",
    )
    parser.add_argument("--ae-title", help="override node.ae_title")
    parser.add_argument("--host", help="override node.host")
    parser.add_argument("--port", type=int, help="override node.port")
    parser.add_argument(
        "--state-dir", help="override node.state_dir (relative to the current directory)"
    )
    parser.add_argument("--http-host", help="override http.host")
    parser.add_argument("--http-port", type=int, help="override http.port")
    parser.add_argument("--log-format", choices=("text", "json"), help="override logging.format")
    parser.add_argument("--log-level", help="override logging.level")


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The dotted-key overrides given on the command line."""
    overrides: dict[str, object] = {}
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest == "state_dir":
            value = str(Path(value).resolve())
        overrides[key] = value
    return overrides


def run(args: argparse.Namespace) -> int:
    """Load the configuration, set up logging, run the server; the exit status."""
    from node.commands.status import load_cli_config
    from node.errors import NodeError
    from node.logs import configure_logging

    config = load_cli_config(args, overrides_from_args(args))
    if config is None:
        return EXIT_CONFIG
    configure_logging(config.logging.format, config.logging.level)
    logger = logging.getLogger("node.serve")
    logger.info("configuration %s: %s", config.source or "(defaults)", config.summary())

    from node.server import NodeServer

    server = NodeServer(config)
    try:
        return server.run()
    except (OSError, NodeError) as exc:
        logger.error("start-up failed: %s", exc)
        return EXIT_STARTUP
