"""`python -m mmft ...` (what `torchrun -m mmft train ...` runs)."""
import sys

from mmft.cli import main

sys.exit(main())
