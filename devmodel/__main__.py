"""``python -m devmodel`` is the same as the ``devmodel`` console script."""

import sys

from devmodel.cli import main

sys.exit(main())
