"""`python -m loadtest` = `workmem bench serve` (see loadtest/cli.py)."""
from loadtest.cli import main

raise SystemExit(main())
