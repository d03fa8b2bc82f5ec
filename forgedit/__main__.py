"""``python -m forgedit``: the offline command line (see forgedit.cli)."""

import sys

from forgedit.cli import main

if __name__ == "__main__":
    sys.exit(main())
