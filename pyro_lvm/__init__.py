"""pyro_lvm: latent variable models and variational inference on Pyro."""

__version__ = "0.1.0"

__all__ = ["__version__", "build", "load_run"]


def __getattr__(name: str):
    """``load_run`` and ``build`` are imported on first use (the CLI imports this package
    before any heavy module)."""
    if name == "load_run":
        from pyro_lvm.runs.load import load_run

        return load_run
    if name == "build":
        from pyro_lvm.spec import build

        return build
    raise AttributeError(f"module 'pyro_lvm' has no attribute {name!r}")
