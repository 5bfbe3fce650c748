"""``python -m symfast ...``: same as the ``symfast`` console script."""

from .cli import main

raise SystemExit(main())
