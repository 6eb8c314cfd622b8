#!/usr/bin/env bash
# Builds the virtual environment `make setup`, `make demo` and `make test` run in:
#   scripts/install-python-deps.sh VENV PYTHON
# The packages are installed by uv (from PyPI, into the venv): a fresh install took 26 s with it and about
# 3 min with pip, which unpacks torch's 3 GB of CUDA libraries one file at a time. Same resolution as pip
# (`--index-strategy unsafe-best-match`: the best version across every index, as pip chooses) and the same
# indexes: uv does not read pip's configuration, so the ones this machine's pip is configured with (a local
# wheel mirror, find-links folders, constraints, a CA bundle) are handed to it. Its cache stays in the checkout (.cache/uv), on the
# venv's file system, so the venv's files are hard links to it rather than copies.
set -euo pipefail
venv=${1:?usage: install-python-deps.sh VENV PYTHON}
python=${2:-python3}
py="$venv/bin/python"
test -x "$py" || "$python" -m venv "$venv"
"$py" -m pip install -q --upgrade pip uv

args=(--python "$py" --quiet --index-strategy unsafe-best-match)
pip_setting() {  # pip's value of one setting (its config files and PIP_* variables), empty when unset
  "$py" -m pip config list 2>/dev/null | sed -n "s/^[a-z]*\.$1='\(.*\)'$/\1/p" | tail -1
}
index=${PIP_INDEX_URL:-$(pip_setting index-url)}
if [ -n "$index" ]; then args+=(--index-url "$index"); fi
for url in ${PIP_EXTRA_INDEX_URL:-$(pip_setting extra-index-url)}; do args+=(--extra-index-url "$url"); done
for dir in ${PIP_FIND_LINKS:-$(pip_setting find-links)}; do args+=(--find-links "$dir"); done
for file in ${PIP_CONSTRAINT:-$(pip_setting constraint)}; do args+=(--constraint "$file"); done
cert=${PIP_CERT:-$(pip_setting cert)}
if [ -n "$cert" ]; then export SSL_CERT_FILE=${SSL_CERT_FILE:-$cert}; fi

export UV_CACHE_DIR=${UV_CACHE_DIR:-$PWD/.cache/uv}
# The runtime (grok_pacs, with the extras the rest needs) and the development packages (training, export,
# devtools, bench: dev/pyproject.toml), both editable: importable from any directory, the wheel stays grok_pacs.
"$py" -m uv pip install "${args[@]}" -e '.[train,export,test]' -e ./dev
"$py" -m uv pip install "${args[@]}" --no-deps -r requirements-nodeps.txt
