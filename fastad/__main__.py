"""``python -m fastad ...`` (and ``torchrun -m fastad ...``): the ``fastad`` command line."""
import sys

from .cli import main

sys.exit(main())
