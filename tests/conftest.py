"""Fixtures shared by the tests. Nothing here needs the network or files outside the repo."""

import os
from pathlib import Path

import pytest

from fake_mnist import make_fake_mnist


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A folder of synthetic MNIST files in the real IDX format (see fake_mnist.py)."""
    return make_fake_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def real_mnist_root() -> Path:
    """$MNIST_ROOT, a folder with the real MNIST files; the test is skipped without it."""
    root = os.environ.get("MNIST_ROOT")
    if not root or not (Path(root) / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("set MNIST_ROOT to a folder with the real t10k-images-idx3-ubyte.gz")
    return Path(root)
