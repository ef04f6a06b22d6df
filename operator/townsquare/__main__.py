"""`python -m townsquare` runs the same command line as the `townsquare` script."""

import sys

from townsquare.cli import main

sys.exit(main())
