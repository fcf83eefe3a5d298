"""``python -m kvstack.store``: the same as the ``kvstack-store`` console script."""

import sys

from kvstack.store.cli import main

sys.exit(main())
