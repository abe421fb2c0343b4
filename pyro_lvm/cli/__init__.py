"""The command line, ``pyro-lvm`` and ``python -m pyro_lvm``: one parser tree
(:mod:`~pyro_lvm.cli.parser`) and one module per group of subcommands (``quickstart`` and
``train``, the commands on a run folder, ``gaps``, ``variance``, the recipes). ``pyro-lvm
--help`` imports no subcommand, torch or Pyro."""

from pyro_lvm.cli.parser import CLIError, build_parser, main

__all__ = ["CLIError", "build_parser", "main"]
