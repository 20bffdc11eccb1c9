"""torchrun entry of the DDP tests (not a test module): runs ``pipeline.train_student.main`` with a spy on
``evaluate`` that saves this rank's model weights after each epoch to ``$SPY_DIR/rank<R>.pt`` and its loss state
(heads, memories) to ``$SPY_DIR/criterion<R>.pt`` (then the real evaluation runs unchanged). With
``$FAIL_RANK`` = R, rank R raises at its second training step instead (a failed rank)."""

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
_real_evaluate_run = run._evaluate


def _spy_run(r):
    torch.save({k: v.detach().clone() for k, v in r.parts.criterion.state_dict().items()},
               os.path.join(os.environ["SPY_DIR"], f"criterion{os.environ['RANK']}.pt"))
    return _real_evaluate_run(r)


run._evaluate = _spy_run
if os.environ.get("FAIL_RANK") == os.environ.get("RANK"):
    import stage2_student_train.loop as loop

    _real_make_batch = loop.make_batch
    _calls = [0]

    def _failing_make_batch(*args, **kwargs):
        _calls[0] += 1
        if _calls[0] == 2:
            raise RuntimeError("this rank fails on purpose (FAIL_RANK)")
        return _real_make_batch(*args, **kwargs)

    loop.make_batch = _failing_make_batch

if __name__ == "__main__":
    from pipeline.train_student import main

    sys.exit(main(sys.argv[1:]))
