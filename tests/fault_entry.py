"""Run the lolcats CLI with a fault hook installed (tests only).

    python tests/fault_entry.py kill KEY -- linearize RECIPE …     SIGKILL this process at fault point KEY
    python tests/fault_entry.py record FILE -- linearize RECIPE …  append every fault point's key to FILE
    python tests/fault_entry.py nan KEY -- linearize RECIPE …      make the loss at point KEY non-finite

It works as the module torchrun starts too (``torchrun … tests/fault_entry.py kill KEY -- …``). Keys
are ``<scope>/<name>``, e.g. ``stage1:micro4`` (before micro-step 4 of stage 1) or
``stage2:save2/write:weights.safetensors:before-rename`` (inside the write of a checkpoint).
"""

from __future__ import annotations

import os
import signal
import sys

from lolcats import cli
from lolcats.io import set_fault_hook


def install(mode: str, arg: str) -> None:
    if mode == "kill":
        def hook(key: str) -> bool:
            if key == arg:
                os.kill(os.getpid(), signal.SIGKILL)
            return False
    elif mode == "record":
        def hook(key: str) -> bool:
            with open(arg, "a") as f:
                f.write(key + "\n")
            return False
    elif mode == "nan":
        def hook(key: str) -> bool:
            return key == arg
    else:
        raise SystemExit(f"unknown fault mode {mode!r}; use kill, record or nan")
    set_fault_hook(hook)


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[3] != "--":
        raise SystemExit(__doc__)
    install(sys.argv[1], sys.argv[2])
    sys.exit(cli.main(sys.argv[4:]))
