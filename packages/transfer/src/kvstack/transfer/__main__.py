"""``python -m kvstack.transfer``: the same as the ``kvstack-transfer`` console script."""

import sys

from kvstack.transfer.cli import main

sys.exit(main())
