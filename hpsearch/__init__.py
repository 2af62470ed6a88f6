"""hpsearch: hyperparameter search for PyTorch models from one YAML job file."""

__version__ = "0.1.0"
