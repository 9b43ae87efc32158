"""`ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/digits.yaml [...]`

The same code path as `lte-ray train` (every option of it works here). Inside a Ray job
RAY_ADDRESS names the cluster, so the run uses it instead of starting a local one.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds lte_ray/

from lte_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
