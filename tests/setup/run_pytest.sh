#!/usr/bin/env bash
# Run the suite; pytest exits 5 when it collected nothing, which must fail CI loudly
# rather than pass silently.
set -u
cd "$(dirname "$0")/../.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: treating as failure" >&2
  exit 1
fi
exit $rc
