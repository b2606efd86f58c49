"""`python -m dsnas ...`: the `dsnas` command, for an environment whose scripts folder is not on PATH."""

import sys

from dsnas.cli import main

sys.exit(main())
