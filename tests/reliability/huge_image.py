"""Run by tests/test_bad_inputs.py in a fresh process (so the peak-memory reading belongs to this case alone): a
10000x10000 JPEG in an image folder, through build_data's corrupt-file scan, one full training epoch (the crop is
decoded from the JPEG's window) and the validation pass. Prints ``RESULT {json}`` with the peak resident memory
before and after the data work.

Usage: python tests/reliability/huge_image.py FOLDER SCAN_CACHE_DIR
"""

from __future__ import annotations

import json
import resource
import sys
import time


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    import numpy as np

    from jaxtl.config import base_config
    from jaxtl.data import build_data

    folder, cache = sys.argv[1], sys.argv[2]
    d = base_config().data
    d.path, d.size = folder, 32
    before = peak_mib()
    t0 = time.time()
    bundle = build_data(d, 1, 0, cache_dir=cache)
    train = [b["image"] for b in bundle.train_batches(0)]
    valid = [b["image"][b["mask"]] for b in bundle.valid_batches()]
    out = {
        "baseline_mib": before, "peak_mib": peak_mib(), "seconds": time.time() - t0,
        "num_train": bundle.num_train, "num_valid": bundle.num_valid, "corrupt": bundle.corrupt,
        "train_batches": len(train), "valid_images": int(sum(len(v) for v in valid)),
        "finite": bool(all(np.isfinite(x).all() for x in train + valid)),
        "valid_items": [p for p, _ in bundle.valid_items],
    }
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
