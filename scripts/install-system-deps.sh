#!/usr/bin/env bash
# Installs the system programs grok-pacs' tests and demo use as real peers, when missing:
# DCMTK (storescu/storescp/echoscu/img2dcm/dcmdump/dsr2html), dicom3tools (dciodvfy), Redis, Orthanc,
# PostgreSQL 15, systemd-analyze (the systemd package; only its tools are used, nothing is booted), promtool (the
# prometheus package; nothing is started); for the browser test
# (tests/deploy/test_viewer.py): Orthanc's DICOMweb plugin, chromium (driven headless by Playwright), npm
# (scripts/fetch-ohif.sh fetches the OHIF viewer with it) and tesseract (OCR of what the viewer shows).
# Debian packages; needs root (or sudo). Does nothing when everything is already there.
# `install-system-deps.sh demo` installs only what `make demo` uses (DCMTK's storescp as the PACS): a fresh
# machine starts the demo without waiting for chromium, PostgreSQL or Orthanc.
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
if [ "${1:-all}" != "demo" ]; then
  command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)  # verifies deploy/systemd units
  command -v promtool >/dev/null 2>&1 || need+=(prometheus)  # promtool checks and unit-tests deploy/prometheus rules
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)  # the server database (GROK_PACS_DATABASE_URL)
  test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || need+=(orthanc-dicomweb)
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v npm >/dev/null 2>&1 || need+=(npm)
  command -v tesseract >/dev/null 2>&1 || need+=(tesseract-ocr tesseract-ocr-eng)  # reads the viewer's PDF on screen
fi
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "installing system packages: ${need[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# policy-rc.d keeps the packages from starting their own daemons: tests start their own on free ports.
$SUDO sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
$SUDO rm -f /usr/sbin/policy-rc.d
