"""Run by tests/test_interrupt.py and killed with SIGKILL at a random moment: writes checkpoints through
``jaxtl.checkpoint.Checkpointer`` in a loop. Checkpoint ``k`` holds arrays filled with ``k`` (about 24 MB, so a
write takes a while) and the metadata ``{"step": k}``; the test checks that whatever survives a kill is complete.

Prints ``saving k`` before and ``saved k`` after each write. Usage: ckpt_writer.py WORK_DIR FIRST_STEP
"""

from __future__ import annotations

import sys

import numpy as np


def state(step: int) -> dict:
    return {"params": {"w": np.full((5_000_000,), step, np.float32), "b": np.full((1000, 1000), step, np.float32)},
            "step": np.asarray(step, np.int32)}


def main() -> None:
    from jaxtl.checkpoint import Checkpointer

    ck = Checkpointer(sys.argv[1])
    step = int(sys.argv[2])
    while True:
        print(f"saving {step}", flush=True)
        ck.save(step, state(step), {"step": step})
        ck.wait()  # saves are asynchronous: "saved" means on disk
        print(f"saved {step}", flush=True)
        step += 1


if __name__ == "__main__":
    main()
