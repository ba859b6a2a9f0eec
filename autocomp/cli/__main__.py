"""``python -m autocomp.cli``: the same as the ``autocomp`` console script."""

import sys

from autocomp.cli import main

sys.exit(main())
