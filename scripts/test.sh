#!/usr/bin/env bash
# Run the whole test suite (CPU, no weights, no downloads).
. "$(dirname "$0")/env.sh"
python -m pytest "$@"
