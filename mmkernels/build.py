"""``python -m mmkernels.build``: compile the C++ CPU kernels for the installed torch now.

Without it they are compiled at the first CPU-backend call (see ``mmkernels._ext``). Run it
after installing, in a Docker build step, or after a torch upgrade, so no job pays for the
build. ``--force`` rebuilds from scratch, ``--debug`` keeps symbols (unoptimised),
``--dir`` prints the build directory and exits.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild from scratch")
    parser.add_argument("--debug", action="store_true", help="unoptimised build with debug symbols")
    parser.add_argument("--dir", action="store_true", help="print the build directory and exit")
    args = parser.parse_args(argv)

    from mmkernels import _ext

    if args.dir:
        print(_ext.build_dir(args.debug))
        return 0
    try:
        path = _ext.build(force=args.force, debug=args.debug)
        _ext._import_library(path)  # the library must load into this torch, not only link
    except Exception as exc:
        print(f"mmkernels: building the C++ CPU kernels failed:\n{exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
