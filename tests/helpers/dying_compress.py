"""``scripts/compress.py`` in which the process of rank ``DYING_RANK`` dies (``os._exit``) as it reaches decoder layer
``DYING_LAYER``: a process killed in the middle of a launch of several, for the distributed tests."""

import os
import sys

from distill_lr import driver
from distill_lr.cli import main

real = driver.compress_layer


def dying(run, index, *args, **kwargs):
    if index == int(os.environ["DYING_LAYER"]) and os.environ.get("RANK", "0") == os.environ["DYING_RANK"]:
        os._exit(9)
    return real(run, index, *args, **kwargs)


driver.compress_layer = dying

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
