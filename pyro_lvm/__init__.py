"""pyro_lvm: latent variable models and variational inference on Pyro."""

__version__ = "0.1.0"

__all__ = ["__version__"]
