"""``python -m ozwell_asgi``: the ``ozwell-asgi`` command line (see :mod:`ozwell_asgi.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
