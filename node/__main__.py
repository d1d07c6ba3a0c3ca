"""``python -m node`` is the same as the ``msknode`` command."""

from node.cli import main

main()
