#!/usr/bin/env python
"""The offline demo datasets (openclipart GENERAL/DOMAIN, textile inspection) as shards: `mmft demo-data`.

    python tools/make_demo_data.py data/demo            # both, ~1-2 min on 2 cores
    python tools/make_demo_data.py data/demo --which textile --limit 50
"""
import sys

from mmft.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo-data", *sys.argv[1:]]))
