"""``python -m pyro_lvm`` runs the command-line interface."""

from pyro_lvm.cli.parser import main

if __name__ == "__main__":
    raise SystemExit(main())
