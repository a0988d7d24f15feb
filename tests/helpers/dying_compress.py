"""``scripts/compress.py`` in which the process of rank ``DYING_RANK`` dies (``os._exit``): as it reaches decoder layer
``DYING_LAYER``, or once the end-to-end stage has saved its state ``DYING_E2E_SAVE`` times. A process killed in the
middle of a launch of several, for the distributed tests."""

import os
import sys

from distill_lr import driver
from distill_lr.cli import main
from distill_lr.stages import e2e

real_layer, real_save = driver.compress_layer, e2e._save_state
saves = 0


def dying_here() -> bool:
    return os.environ.get("RANK", "0") == os.environ["DYING_RANK"]


def dying_layer(run, index, *args, **kwargs):
    if index == int(os.environ.get("DYING_LAYER", -1)) and dying_here():
        os._exit(9)
    return real_layer(run, index, *args, **kwargs)


def dying_save(*args, **kwargs):
    global saves
    real_save(*args, **kwargs)
    saves += 1
    if saves == int(os.environ.get("DYING_E2E_SAVE", -1)) and dying_here():
        os._exit(9)


driver.compress_layer, e2e._save_state = dying_layer, dying_save

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
