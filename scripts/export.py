"""From a checkout: `python scripts/export.py --help` runs jaxvlm-export (jaxvlm/cli/export.py)."""
import sys

from jaxvlm.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
