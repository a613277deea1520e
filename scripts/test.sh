#!/usr/bin/env bash
# Install everything the tests need (Python packages, redis-server) and run the whole suite.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test || exit 1
if ! command -v redis-server >/dev/null; then
  echo "installing redis-server (the prefix-cache tests start their own)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null || {
    echo "could not install redis-server"; exit 1; }
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: that is a failure"
  exit 1
fi
exit $rc
