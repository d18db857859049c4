import sys

from server.cli import main

if __name__ == "__main__":  # not when a spawned tensor-parallel rank re-imports the main module
    sys.exit(main())
