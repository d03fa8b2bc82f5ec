"""``python -m forgedit_client``: the ``forgedit`` command line."""

import sys

from forgedit_client.cli import main

sys.exit(main())
