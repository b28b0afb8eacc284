"""`difftrain train` under torchrun with test hooks, for tests/test_distributed.py and bench/ddp_scaling.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py train digits key=value ...

DDP_TEST_FAULT=RANK:STEP:KIND  rank RANK, when about to take step STEP (1-based), raises a TrainingError
                               (KIND=error) or sends itself a signal (KIND=SIGTERM, SIGKILL, ...).
DDP_TEST_DUMP=1                after training, every rank writes RUN_DIR/rank-R.pt: its raw and EMA weights.
"""

import os
import signal
import sys
from pathlib import Path

import torch

from difftrain.cli import main
from difftrain.training import Engine, TrainingError

fault = os.environ.get("DDP_TEST_FAULT")
if fault:
    fault_rank, fault_step, kind = fault.split(":")
    train_step = Engine.train_step

    def faulty_train_step(self, lr):
        if self.world.rank == int(fault_rank) and self.step == int(fault_step) - 1:
            if kind == "error":
                raise TrainingError(f"forced failure on rank {fault_rank} at step {fault_step} (test hook)")
            os.kill(os.getpid(), getattr(signal, kind))
        return train_step(self, lr)

    Engine.train_step = faulty_train_step

if os.environ.get("DDP_TEST_DUMP"):
    run = Engine.run

    def run_and_dump(self):
        out = run(self)
        torch.save({"model": self.task.model.state_dict(), "ema": self.task.ema.model.state_dict(), "step": self.step},
                   Path(self.cfg.run_dir) / f"rank-{self.world.rank}.pt")
        return out

    Engine.run = run_and_dump

raise SystemExit(main(sys.argv[1:]))
