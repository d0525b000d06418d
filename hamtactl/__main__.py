"""``python -m hamtactl ...``: the ``hamta`` command, for processes started by path to Python."""

import sys

from hamtactl import main

sys.exit(main())
