"""``python -m backends.sim --profile sim-small --port 8100``."""

import sys

from .server import main

sys.exit(main())
