"""transferd: deliver archived data products from tape to the storage of the people who ask."""

__version__ = "0.1.0"
