#!/usr/bin/env bash
# Runs every go fuzz target in the module for FUZZTIME (default 20s) each.
# The checked-in seed corpora (testdata/fuzz/) already run in `make unit`; this explores.
set -euo pipefail
cd "$(dirname "$0")/.."
t=${FUZZTIME:-20s}
grep -rl --include='*_test.go' '^func Fuzz' . | while read -r f; do
  dir=$(dirname "$f")
  grep -o '^func Fuzz[A-Za-z0-9_]*' "$f" | sed 's/^func //' | while read -r fn; do
    echo "== $dir $fn ($t)"
    go test -run='^$' -fuzz="^${fn}\$" -fuzztime="$t" "./$dir"
  done
done
