"""``fcnfast train`` under torchrun that also saves every process's final weights.

Usage: ``torchrun ... tests/ddp_worker.py DUMP_DIR train ARGS...``. After training, each
process writes ``DUMP_DIR/rank<RANK>.pt`` (its model's state_dict), so test_ddp.py can check
that the replicas stayed in sync. This hook belongs to the test, not to fcnfast.
"""

import os
import sys
from pathlib import Path

import torch

import fcnfast.train
from fcnfast.cli import main


def _dumping(train, dump_dir: Path):
    def train_and_dump(*args, **kwargs):
        result = train(*args, **kwargs)
        torch.save(
            result.model.state_dict(), dump_dir / ("rank%s.pt" % os.environ.get("RANK", "0"))
        )
        return result

    return train_and_dump


if __name__ == "__main__":
    fcnfast.train.train = _dumping(fcnfast.train.train, Path(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
