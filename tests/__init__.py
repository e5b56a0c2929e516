"""The test suite; imported before its conftest and every test module."""

import sys

# Every xdist worker imports (and has pytest rewrite) the same hundred and fifty modules, and
# the bots it starts import the product's again: with PYTHONDONTWRITEBYTECODE set, each process
# would compile them all anew, seconds of CPU a process. The caches go to __pycache__ as usual.
sys.dont_write_bytecode = False
