"""``python -m cb_lab.bench``: see ``cb_lab/bench/__init__.py``."""

from cb_lab.bench import main

raise SystemExit(main())
