"""``python -m kvstack.serve``: the ``kvstack-serve`` command."""

import sys

from kvstack.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
