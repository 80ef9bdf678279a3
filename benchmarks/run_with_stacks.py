"""Run a script and print every thread's Python stack every N seconds while it runs.

    python3 benchmarks/run_with_stacks.py 60 train.py --config ... [script arguments]

For telling a slow step from a hang on a machine where nothing can be attached to the process
(``benchmarks/gpu_check.sh`` uses it for the compiled fit that did not exit on an H100). The dumps
come from a daemon Python thread reading ``sys._current_frames()`` under the GIL, so they need no
signal handler (a SIGABRT printed nothing there) and also cover the exit's thread joins and atexit
handlers, which run before daemon threads stop. faulthandler's ``dump_traceback_later`` was used
first: its watchdog walks the other threads' frames without the GIL, and on an H200 (2026-11-28) it
crashed the process (SIGSEGV) at a dump while inductor was compiling.
"""
from __future__ import annotations

import runpy
import sys
import threading
import time
import traceback


def dump_stacks(out=sys.stderr) -> None:
    """Every thread's Python stack, innermost call last, as ``traceback`` formats it."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    lines = [f"--- stacks at {time.strftime('%T')} ---"]
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        lines.append(f"Thread {names.get(ident, '?')} ({ident:#x}):")
        lines.extend(s.rstrip("\n") for s in traceback.format_stack(frame))
    print("\n".join(lines), file=out, flush=True)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: run_with_stacks.py SECONDS SCRIPT [ARGS...]")
    every = float(sys.argv[1])
    script = sys.argv[2]
    sys.argv = sys.argv[2:]  # the script sees its own argv

    def watch() -> None:
        while True:
            time.sleep(every)
            dump_stacks()

    threading.Thread(target=watch, name="run_with_stacks", daemon=True).start()
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
