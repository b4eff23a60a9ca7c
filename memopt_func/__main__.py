"""``python -m memopt_func``: the ``memopt-func`` command line (``memopt_func.apps.cli``)."""

import sys

from .apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
