"""Run a script and print every thread's Python stack every N seconds while it runs.

    python3 benchmarks/run_with_stacks.py 60 train.py --config ... [script arguments]

For telling a slow step from a hang on a machine where nothing can be attached to the process
(``benchmarks/gpu_check.sh`` uses it for the compiled fit that did not exit on an H100): the dumps
come from faulthandler's watchdog thread, so they need no signal handler and also cover the
interpreter's exit (atexit handlers, thread joins), where a SIGABRT printed nothing.
"""
from __future__ import annotations

import faulthandler
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: run_with_stacks.py SECONDS SCRIPT [ARGS...]")
    every = float(sys.argv[1])
    script = sys.argv[2]
    sys.argv = sys.argv[2:]  # the script sees its own argv
    faulthandler.dump_traceback_later(every, repeat=True, file=sys.stderr)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
