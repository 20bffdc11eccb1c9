"""Driver of the reliability tests (not a test module): run ``python -m MODULE ARGS...`` in this process and
SIGKILL it (or pause it) just before a chosen source line runs for the n-th time.

    REL_POINT='{"module": "pipeline.bank.writer", "func": "write_rows", "line": "g[\\"done\\"][j] = True",
                "hit": 3, "action": "kill"}' python tests/reliability/rel_driver.py pipeline.dump_logits ARGS...

``action``: ``kill`` (SIGKILL this process: no cleanup, no atexit, no finally) or ``pause`` (create
``<REL_PAUSE>.paused``, then wait until the file ``REL_PAUSE`` exists and carry on). Without ``REL_POINT`` the
module just runs. Also works under ``torchrun`` (the point fires in every rank that reaches it; ``ranks`` limits it).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import runpy
import signal
import sys
import threading
import time


def _install(point: dict) -> None:
    fn = getattr(importlib.import_module(point["module"]), point["func"])
    src, first = inspect.getsourcelines(fn)
    lines = [first + k for k, text in enumerate(src) if point["line"] in text]
    if len(lines) != 1:
        raise SystemExit(f"rel_driver: line {point['line']!r} found {len(lines)} times in {point['func']}")
    target, code, hits = lines[0], fn.__code__, [0]
    rank = int(os.environ.get("RANK", "0"))
    if "ranks" in point and rank not in point["ranks"]:
        return

    def on_line(frame, event, arg):
        if event == "line" and frame.f_lineno == target:
            hits[0] += 1
            if hits[0] == point["hit"]:
                sys.settrace(None)
                if point["action"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                    time.sleep(60)
                pause = os.environ["REL_PAUSE"]
                open(pause + ".paused", "w").close()
                deadline = time.time() + 300
                while not os.path.exists(pause) and time.time() < deadline:
                    time.sleep(0.01)
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code is code else None

    sys.settrace(on_call)
    threading.settrace(on_call)


if __name__ == "__main__":
    if os.environ.get("REL_POINT"):
        _install(json.loads(os.environ["REL_POINT"]))
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
