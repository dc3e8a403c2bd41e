"""The one place the version lives; setup.py, `smrd --version` and the images read it."""
__version__ = "0.1.0"
