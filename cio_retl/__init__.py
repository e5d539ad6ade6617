"""cio-retl: keep Customer.io equal to your warehouse."""

__version__ = "0.1.0"
