"""`ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/digits.yaml
--grid lte.rank=4,8 --grid lte.heads=2,4 [--asha] [...]`: the same code path as `lte-ray tune`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds lte_ray/

from lte_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
