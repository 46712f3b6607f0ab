#!/usr/bin/env python
"""Write image-text shards from a folder, a CSV/TSV/JSONL table or class folders: `mmft shards` (mmft/cli.py).

    python tools/make_shards.py photos/ data/photos --splits train=0.9,val=0.05,test=0.05 --max-side 512
"""
import sys

from mmft.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", *sys.argv[1:]]))
