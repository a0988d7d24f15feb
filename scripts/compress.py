"""Compress a causal LM layer by layer: ``python scripts/compress.py [--config FILE] [key=value ...]`` is ``distill-lr compress``."""

import sys

from distill_lr.cli import main

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
