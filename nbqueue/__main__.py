"""``python -m nbqueue`` is the ``nbqueue`` command."""

import sys

from .cli import main

sys.exit(main())
