"""Reproduction recipes; each module is a script: ``python recipes/<name>.py --help``."""
