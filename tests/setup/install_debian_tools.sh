#!/usr/bin/env bash
# Install the Debian tools the integration tests use, when root and missing:
# dcmtk (peers), dicom3tools (dciodvfy), orthanc (the PACS), postgresql, openjph-tools (HTJ2K fixtures),
# chromium (+ chromium-driver, fonts) for the dashboard's browser tests.
# Without root nothing is installed; the tests that need a tool skip with a reason.
set -u
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v ojph_compress >/dev/null 2>&1 || need+=(openjph-tools)
[ -x /usr/bin/chromium ] || need+=(chromium chromium-driver fonts-dejavu-core)
if [ ${#need[@]} -eq 0 ]; then
  echo "debian tools: all present"
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "debian tools: not root, not installing ${need[*]}; the tests that need them will skip"
  exit 0
fi
echo "debian tools: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || echo "apt-get update failed; trying install anyway"
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  || echo "debian tools: apt-get install failed for ${need[*]}; dependent tests will skip"
# The Debian orthanc package starts a system service on 4242; the tests run their own.
if command -v systemctl >/dev/null 2>&1; then systemctl stop orthanc >/dev/null 2>&1 || true; fi
service orthanc stop >/dev/null 2>&1 || true
exit 0
