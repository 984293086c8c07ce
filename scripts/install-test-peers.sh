#!/usr/bin/env bash
# Install the Debian packages the integration tests drive as real peers
# (chromium runs the OHIF viewer test).
# Idempotent: does nothing when every tool is already on PATH.
set -euo pipefail
need=()
command -v /usr/bin/storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "installing test peers: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts an Orthanc service on install; the tests run their own.
if command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now orthanc >/dev/null 2>&1 || true
fi
