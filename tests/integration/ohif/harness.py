"""Set-up of the OHIF viewer test: the prebuilt viewer and playwright-core in a cache.

``ensure_viewer()`` installs, once per machine, ``npm pack @ohif/app@3.13.2`` (its
``dist/`` is a complete prebuilt viewer; the ONNX runtime and microscopy viewer folders are
removed, 204 MB -> 49 MB) and ``playwright-core`` into ``~/.cache/lumbar-node/ohif``
(``LUMBAR_NODE_OHIF_CACHE`` overrides). Later runs reuse it. Chromium itself is the Debian
package (``scripts/install-test-peers.sh``), never a playwright download.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

OHIF_VERSION = "3.13.2"
PLAYWRIGHT_VERSION = "1.65.1"
CHROMIUM = Path("/usr/bin/chromium")
NPM_TIMEOUT_S = 600
HERE = Path(__file__).resolve().parent
SHOOT_JS = HERE / "shoot.js"
#: dist/ folders the viewer does not need for SEG display.
PRUNED = ("ort", "dicom-microscopy-viewer")


@dataclass(frozen=True)
class Viewer:
    dist: Path
    node_modules: Path


def cache_dir() -> Path:
    override = os.environ.get("LUMBAR_NODE_OHIF_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "lumbar-node" / "ohif"


def _install_peers() -> None:
    script = Path(__file__).resolve().parents[3] / "scripts" / "install-test-peers.sh"
    subprocess.run(["bash", str(script)], check=True, timeout=NPM_TIMEOUT_S)  # noqa: S603, S607


def ensure_viewer() -> Viewer:
    """The cached viewer and playwright-core, installed on first use."""
    if not CHROMIUM.exists():
        _install_peers()
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    dist = root / f"ohif-app-{OHIF_VERSION}" / "dist"
    if not (dist / "index.html").is_file():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            subprocess.run(  # noqa: S603, S607
                ["npm", "pack", f"@ohif/app@{OHIF_VERSION}", "--silent"],
                cwd=tmp, check=True, timeout=NPM_TIMEOUT_S, capture_output=True,
            )
            tgz = next(Path(tmp).glob("ohif-app-*.tgz"))
            with tarfile.open(tgz) as tar:
                tar.extractall(tmp, filter="data")
            for name in PRUNED:
                shutil.rmtree(Path(tmp) / "package" / "dist" / name, ignore_errors=True)
            target = root / f"ohif-app-{OHIF_VERSION}"
            shutil.rmtree(target, ignore_errors=True)
            (Path(tmp) / "package").rename(target)
    node_modules = root / "node_modules"
    package_json = node_modules / "playwright-core" / "package.json"
    if not package_json.is_file() or json.loads(package_json.read_text())["version"] != PLAYWRIGHT_VERSION:
        subprocess.run(  # noqa: S603, S607
            ["npm", "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(root),
             f"playwright-core@{PLAYWRIGHT_VERSION}"],
            check=True, timeout=NPM_TIMEOUT_S, capture_output=True,
        )
    return Viewer(dist=dist, node_modules=node_modules)


def shoot(viewer: Viewer, url: str, screenshot: Path, labels: list[str], timeout_s: float,
          steps: int = 0) -> dict[str, object]:
    """Run ``shoot.js``: open ``url``, wait for ``labels``, step ``steps`` images down,
    save the screenshot."""
    env = dict(os.environ, NODE_PATH=str(viewer.node_modules), SHOOT_STEPS=str(steps))
    proc = subprocess.run(  # noqa: S603, S607
        ["node", str(SHOOT_JS), url, str(screenshot), str(int(timeout_s * 1000)), *labels],
        capture_output=True, text=True, timeout=timeout_s + 120, env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"shoot.js failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result: dict[str, object] = json.loads(lines[-1])
    return result
