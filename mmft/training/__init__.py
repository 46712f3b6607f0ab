"""Training stage: the trainer loop, head-only training on cached features, and in-loop validation.

It writes the run directory (mmft.rundir); no later stage imports this package.
"""
