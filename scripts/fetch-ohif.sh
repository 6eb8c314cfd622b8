#!/usr/bin/env bash
# Puts the built OHIF viewer (@ohif/app from the npm registry; its package ships a built dist/) under
# .cache/ohif/<version>/dist for the browser test and devtools/ohif_server.py. Does nothing when it is there.
# Needs npm (scripts/install-system-deps.sh installs it). The packaged app-config.js is left as it is:
# devtools/ohif_server.py serves devtools/ohif/app-config.js in its place.
set -euo pipefail
VERSION=3.13.2
cd "$(dirname "$0")/.."
target=".cache/ohif/$VERSION"
if [ -f "$target/dist/index.html" ]; then
  exit 0
fi
staging=".cache/ohif/.staging-$$"
trap 'rm -rf "$staging"' EXIT
mkdir -p "$staging"
echo "fetching @ohif/app@$VERSION (npm pack, ~50 MB)"
(cd "$staging" && npm pack --silent "@ohif/app@$VERSION" >/dev/null && tar xzf "ohif-app-$VERSION.tgz")
test -f "$staging/package/dist/index.html" || { echo "@ohif/app@$VERSION has no dist/index.html" >&2; exit 1; }
rm -rf "$target"
mv "$staging/package" "$target"  # one rename: a concurrent reader sees the whole build or none
