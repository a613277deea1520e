"""`python -m mesh_cli ...`: the `mesh` command."""

import sys

from mesh_cli import main

sys.exit(main())
