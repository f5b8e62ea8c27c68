"""The version of hf-r2 (read by setup.cfg, stored in every saved config)."""

__version__ = "0.1.0"
