"""lte_ray/core is pure PyTorch: importing all of it must not import ray."""

import subprocess
import sys

CODE = """
import importlib, pkgutil, sys
import lte_ray.core as core
for m in pkgutil.iter_modules(core.__path__):
    importlib.import_module(f"lte_ray.core.{m.name}")
import lte_ray.config, lte_ray.data, lte_ray.models
bad = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
print(len([m for m in sys.modules if m.startswith("lte_ray.core.")]), bad)
assert not bad, bad
"""


def test_core_does_not_import_ray():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    n_modules = int(proc.stdout.split()[0])
    assert n_modules >= 8  # the check really imported the core modules
