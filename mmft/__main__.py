"""`python -m mmft ...` (what `torchrun -m mmft train ...` runs)."""
import sys

from .cli import main

sys.exit(main())
