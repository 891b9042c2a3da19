"""Run one command as a whole process and print its wall time and peak RSS as JSON.

Run this small launcher instead of measuring from a large parent: on Linux a child's
`ru_maxrss` starts at its parent's resident size at fork time (the forked address space counts
until exec), so a parent that holds torch would inflate every child it measures.

    python scripts/measure_process.py [--out FILE] -- COMMAND [ARGS...]

The JSON goes to FILE if given, else as the last line on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    out = None
    if argv[:1] == ["--out"]:
        out, argv = argv[1], argv[2:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        sys.exit("usage: measure_process.py -- COMMAND [ARGS...]")
    started = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    result = json.dumps({"returncode": code, "wall_seconds": wall, "peak_rss_bytes": usage.ru_maxrss * 1024})
    if out:
        with open(out, "w") as handle:
            handle.write(result + "\n")
    else:
        print(result, file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
