"""``python -m clipib`` runs the console script."""
import sys

from clipib.cli import main

sys.exit(main())
