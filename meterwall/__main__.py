"""``python -m meterwall`` is the ``meterwall`` command."""

from .cli import main

main()
