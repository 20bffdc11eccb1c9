"""torchrun entry of the DDP test (not a test module): runs ``pipeline.train_student.main`` with a spy on
``evaluate`` that saves this rank's model weights after each epoch to ``$SPY_DIR/rank<R>.pt`` (then the real
evaluation runs unchanged)."""

import os
import sys

import torch

import stage2_student_train.run as run

_real_evaluate = run.evaluate


def _spy(model, *args, **kwargs):
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
               os.path.join(os.environ["SPY_DIR"], f"rank{os.environ['RANK']}.pt"))
    return _real_evaluate(model, *args, **kwargs)


run.evaluate = _spy

if __name__ == "__main__":
    from pipeline.train_student import main

    sys.exit(main(sys.argv[1:]))
