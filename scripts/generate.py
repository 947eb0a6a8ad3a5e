"""From a checkout: `python scripts/generate.py --help` runs jaxvlm-generate (jaxvlm/cli/generate.py)."""
import sys

from jaxvlm.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
