"""Shared test setup. Triton kernels run under its CPU interpreter on CPU machines."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. This must be
# set before triton is imported (importing torch does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
