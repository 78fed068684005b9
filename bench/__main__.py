"""``python -m bench``: the whole benchmark in one run (see :mod:`bench.run`)."""

import sys

from bench.run import main

sys.exit(main())
