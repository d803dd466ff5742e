"""``python -m kernelfit.cli ...``: the same as the ``kernelfit`` console script."""

import sys

from . import main

sys.exit(main())
