"""`python -m clipgen.cli ...`: the `clipgen` command."""

import sys

from clipgen.cli import main

sys.exit(main())
