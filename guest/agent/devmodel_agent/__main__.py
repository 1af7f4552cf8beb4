"""``python3 -m devmodel_agent`` is the ``dm`` command."""

import sys

from devmodel_agent.cli import main

sys.exit(main())
