"""systemd/lumbar-node.service: unprivileged, hardened, restarts on failure.

(``systemd-analyze verify`` passes on it too; see docs/operations.md. Not run here so that
the suite does not depend on systemd being installed.)
"""

from __future__ import annotations

import configparser
from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "lumbar-node.service"


def service_section() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return dict(parser["Service"])


def test_unit_runs_unprivileged_hardened_and_restarts_on_failure() -> None:
    service = service_section()
    expected = {
        "User": "lumbar-node",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ReadWritePaths": "/var/lib/lumbar-node",
        "StateDirectoryMode": "0700",
        "UMask": "0077",
        "KillSignal": "SIGTERM",
        "RestartPreventExitStatus": "2",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert service.get(key) == value, key
    assert " serve --config " in service["ExecStart"]
    assert int(service["TimeoutStopSec"]) > 30  # above the default node.drain_timeout_s
