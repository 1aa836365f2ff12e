"""``python -m jvdm ...``: the same as the ``jvdm`` console script."""

import sys

from jvdm.cli import main

if __name__ == "__main__":
    sys.exit(main())
