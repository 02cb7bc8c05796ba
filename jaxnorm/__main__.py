"""``python -m jaxnorm``: the ``jaxnorm`` command line (see :mod:`jaxnorm.lab.cli`)."""

from jaxnorm.lab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
