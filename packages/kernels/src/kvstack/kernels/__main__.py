"""``python -m kvstack.kernels``: the ``kvstack-kernels`` command line."""

import sys

from kvstack.kernels.cli import main

sys.exit(main())
