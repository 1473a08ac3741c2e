#!/usr/bin/env bash
# Run a command with its output held back: shown only if it fails (then with its exit status), so
# set-up prints nothing a user cannot act on (pip's notices, setuptools' editable-install box).
set -uo pipefail
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if "$@" >"$log" 2>&1; then
  exit 0
else
  status=$?
  cat "$log" >&2
  echo "failed (exit $status): $*" >&2
  exit "$status"
fi
