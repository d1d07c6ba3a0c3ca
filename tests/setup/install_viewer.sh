#!/usr/bin/env bash
# Install the pinned OHIF v3 viewer (the ready-built app in npm @ohif/app's dist/) and dcmjs for tests/viewer,
# with `npm ci` from tests/viewer/package.json + package-lock.json (versions and sha512 integrity pinned).
# The lock file lists @ohif/app without its dependencies on purpose: its dist/ is a complete static build, and
# its source dependencies (bundler loaders, React, an @ohif/i18n version absent from the registry) are not needed
# to serve it. Locally a failure only warns (the viewer tests then skip naming why); under CI (the CI environment
# variable set) it exits 1, like install_debian_tools.sh.
set -u
case "${CI:-}" in ""|0|false|no) ci=0 ;; *) ci=1 ;; esac
cd "$(dirname "$0")/../viewer"
give_up() {
  if [ "$ci" = 1 ]; then
    echo "viewer: $1 — CI is set: failing (the viewer tests would otherwise skip silently)" >&2
    exit 1
  fi
  echo "viewer: $1; the OHIF viewer tests will skip"
  exit 0
}
marker=node_modules/.installed-lock
if [ -f "$marker" ] && cmp -s package-lock.json "$marker" && [ -f node_modules/@ohif/app/dist/index.html ]; then
  echo "viewer: OHIF and dcmjs already installed"
  exit 0
fi
command -v npm >/dev/null 2>&1 || give_up "npm not found (Debian packages nodejs npm)"
echo "viewer: npm ci (@ohif/app 3.13.2 dist, dcmjs 0.52.0)"
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error || give_up "npm ci failed"
[ -f node_modules/@ohif/app/dist/index.html ] || give_up "npm ci left no OHIF dist/index.html"
cp package-lock.json "$marker"
echo "viewer: installed"
exit 0
