"""MultiDigits: a multi-task benchmark of Jacobian descent on real handwritten digits.

Run it with ``python -m examples.multidigits`` (see ``--help``) or ``bash scripts/demo.sh``.
"""
