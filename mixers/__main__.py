"""``python -m seqmix <command> ...``: the same as the ``seqmix`` console command."""
import sys

from seqmix.cli import main

sys.exit(main())
