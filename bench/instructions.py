"""Instructions per chat request of serve's app, in process, counted by callgrind: a figure that load on the machine
does not move (wall-clock and CPU-time figures move by 20% from run to run on a shared machine).

    python bench/instructions.py                  # non-streaming, 960 requests (about 5 minutes)
    python bench/instructions.py --stream         # streaming
    python bench/instructions.py --root DIR       # ozwell_asgi from another source tree (A/B a change)

Runs ``valgrind --tool=callgrind`` (Debian package ``valgrind``) twice at once on this script's ``--child`` mode:
serve's app built as ``bench/inproc.py`` builds it, 320 warm-up requests, ``gc.freeze()`` (as ``serve`` does once
started), then ``--count`` requests or none. Per request: (total with them - total without) / count, with
``PYTHONHASHSEED=0`` so that both runs hash alike. The harness's own work (checking each answer) is included.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


async def child(root: Path, count: int, stream: bool) -> None:
    sys.path.insert(0, str(root))
    sys.argv = [sys.argv[0], "--root", str(root)]
    sys.path.insert(0, str(root / "bench"))
    import inproc

    with tempfile.TemporaryDirectory() as tmp:
        served, _, key = await inproc.build(Path(tmp), 1e6)  # no key cache expiry during the count
        await inproc.run(served, key, stream, 320, 32)
        gc.collect()
        gc.freeze()
        if count:
            await inproc.run(served, key, stream, count, 32)


def collected(output: str) -> int:
    match = re.search(r"Collected : (\d+)", output)
    if match is None:
        raise RuntimeError(output[-2000:])
    return int(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=960)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--root", type=Path, default=HERE.parent, help="the source tree to import ozwell_asgi from")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        import uvloop

        uvloop.run(child(args.root.resolve(), args.child, args.stream))
        return 0
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            subprocess.Popen(
                [
                    "valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={tmp}/callgrind.{n}.out",
                    sys.executable,
                    __file__,
                    "--child",
                    str(n),
                    "--root",
                    str(args.root),
                    *(["--stream"] if args.stream else []),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for n in (0, args.count)
        ]
        none, some = (collected(run.communicate()[0]) for run in runs)
    kind = "streaming" if args.stream else "non-streaming"
    print(f"{kind}: {(some - none) / args.count:,.0f} instructions per request ({none:,} without, {some:,} with)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
