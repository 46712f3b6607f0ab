#!/usr/bin/env python
"""Build the offline demo datasets (openclipart GENERAL/DOMAIN, textile inspection) as shards.

    python tools/make_demo_data.py data/demo            # both, ~1-2 min on 2 cores
    python tools/make_demo_data.py data/demo --which textile --limit 50
"""
import sys

from mmft.demo.datasets import main

if __name__ == "__main__":
    sys.exit(main())
