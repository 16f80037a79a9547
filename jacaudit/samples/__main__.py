"""``python -m jacaudit.samples [--out DIR] [--seed N] [--only NAME ...]``: rebuild the sample models."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import DEFAULT_SEED, NAMES, build, default_out_dir

    p = argparse.ArgumentParser(prog="python -m jacaudit.samples",
                                description="Rebuild the sample models (seeded, CPU, one thread) and their cards.")
    p.add_argument("--out", default=None, help=f"output folder (default: {default_out_dir()})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for every random choice (default 0)")
    p.add_argument("--only", nargs="+", choices=NAMES, default=None, help="build only these models")
    a = p.parse_args(argv)

    import os
    import warnings

    os.environ.setdefault("TORCH_LOGS", "-all")
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch").setLevel(logging.ERROR)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    build(a.only, out_dir=a.out, seed=a.seed, log=log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
