"""opsdrill: proves that backups restore and mail arrives."""

__version__ = "0.1.0"
