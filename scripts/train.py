"""From a checkout: `python scripts/train.py --help` runs jaxvlm-train (jaxvlm/cli/train.py)."""
import sys

from jaxvlm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
