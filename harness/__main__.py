"""``python -m harness``: what launchers run in every rank."""

import sys

from harness.cli import main

sys.exit(main())
