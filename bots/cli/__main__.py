"""``python -m bots.cli``: the terminal chat."""

from __future__ import annotations

import sys

from bots.cli.chat import main

sys.exit(main())
