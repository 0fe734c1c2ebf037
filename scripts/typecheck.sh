#!/usr/bin/env bash
# Type-check saeflow with mypy. The package maps top-level folders (sae/, storage/, tasks/, flows/) into
# `saeflow.*` (pyproject's package-dir); mypy cannot follow setuptools' editable import finder, so it checks a
# tree of symlinks laid out as the installed package: build/typecheck/saeflow/{sae,storage,tasks,flows,...}.
set -euo pipefail
cd "$(dirname "$0")/.."
root=build/typecheck
rm -rf "$root" && mkdir -p "$root/saeflow"
for f in saeflow/*.py; do ln -s "$PWD/$f" "$root/saeflow/"; done
for part in sae storage tasks flows; do ln -s "$PWD/$part" "$root/saeflow/$part"; done
MYPYPATH="$root" exec .venv/bin/mypy "$@" -p saeflow
