"""``python -m nsg_gpu`` runs the ``nsg`` command line."""

from .cli import main

main()
