"""Users' programs written as in Pyro's tutorials, for the tests of ``fit``, ``load_run`` and
``pyro-lvm train --model``."""
