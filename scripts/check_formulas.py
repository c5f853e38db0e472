#!/usr/bin/env python3
"""Check jaxtl's optimisers and schedules against independent NumPy transcriptions of their equations.

Prints one row per rule and quantity (max abs difference, max relative difference, tolerance, pass/FAIL, source
location in jaxtl) and exits 1 if any row fails. Equations and symbols: docs/formulas.md.

    python scripts/check_formulas.py             # plain table
    python scripts/check_formulas.py --markdown  # Markdown table (for notebooks / docs)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxtl.reference import checks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    results = checks.run_all()
    print(checks.format_table(results, markdown=args.markdown))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed "
          f"({checks.N_STEPS} optimiser steps per rule, float32 jaxtl vs float64 transcription)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
