#!/usr/bin/env bash
# Install the Debian tools the integration tests use, when root and missing:
# dcmtk (peers), dicom3tools (dciodvfy), orthanc (the PACS) with orthanc-dicomweb (OHIF reads it by DICOMweb),
# postgresql, openjph-tools (HTJ2K fixtures), chromium (+ chromium-driver, fonts) for the dashboard's and the
# viewer's browser tests, nodejs + npm for the pinned OHIF viewer (tests/setup/install_viewer.sh).
# Locally, without root nothing is installed and the tests that need a tool skip with a reason.
# Under CI (the CI environment variable set) a tool that is still missing at the end is a failure: exit 1,
# naming it, so that a broken install can never turn into a green run of skipped tests.
set -u
case "${CI:-}" in ""|0|false|no) ci=0 ;; *) ci=1 ;; esac
missing_tools() {
  need=()
  command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
  command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
  command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
  [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)  # OHIF viewer test
  command -v npm >/dev/null 2>&1 || need+=(nodejs npm)  # installs the pinned OHIF (tests/setup/install_viewer.sh)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  command -v ojph_compress >/dev/null 2>&1 || need+=(openjph-tools)
  [ -x /usr/bin/chromium ] || need+=(chromium chromium-driver fonts-dejavu-core)
  compgen -G '/usr/lib/*/libexpat.so.1' >/dev/null || compgen -G '/lib/*/libexpat.so.1' >/dev/null \
    || need+=(libexpat1)  # tritonserver (Triton tests)
}
give_up() {
  if [ "$ci" = 1 ]; then
    echo "debian tools: $1 — CI is set: failing (the tests would otherwise skip silently)" >&2
    exit 1
  fi
  echo "debian tools: $1; the tests that need them will skip"
  exit 0
}
# The Triton Inference Server of tests/engines/test_triton*.py: its own venv, no root needed.
if ! bash "$(dirname "$0")/install_triton_server.sh"; then
  [ "$ci" = 1 ] && { echo "triton server: install failed — CI is set: failing" >&2; exit 1; }
  echo "triton server: install failed; the Triton tests will skip"
fi
missing_tools
if [ ${#need[@]} -eq 0 ]; then
  echo "debian tools: all present"
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  give_up "not root, not installing ${need[*]}"
fi
echo "debian tools: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || echo "apt-get update failed; trying install anyway"
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  || echo "debian tools: apt-get install failed for ${need[*]}"
# The Debian orthanc package starts a system service on 4242; the tests run their own.
if command -v systemctl >/dev/null 2>&1; then systemctl stop orthanc >/dev/null 2>&1 || true; fi
service orthanc stop >/dev/null 2>&1 || true
missing_tools
if [ ${#need[@]} -ne 0 ]; then
  give_up "still missing after the install: ${need[*]}"
fi
echo "debian tools: all present"
exit 0
