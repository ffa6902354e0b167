"""Train AnyFlow from a TOML config: the same as ``anyflow train CONFIG`` (see anyflow/cli_train.py).

    python scripts/train.py stage1.toml
    torchrun --nproc-per-node 8 scripts/train.py stage1.toml
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anyflow.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
