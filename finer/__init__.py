"""finer: attribute-grounded fine-grained recognition with vision-language models."""

__version__ = "0.1.0"
