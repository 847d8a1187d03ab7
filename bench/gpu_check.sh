#!/usr/bin/env bash
# The prepared GPU check (see bench/gpu_check.py): bash bench/gpu_check.sh [--dry-run] [OUT]
cd "$(dirname "$0")/.." && exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
