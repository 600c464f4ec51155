"""``python -m apbatch ...``: the same as the ``bin/apbatch`` shim."""

from apbatch.cli import main

main()
