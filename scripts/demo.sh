#!/usr/bin/env bash
# Sparsify a torchvision model with the paper preset; print placement and measured sparsity.
. "$(dirname "$0")/env.sh"
python -m topk_plugin.demo "$@"
