"""pgro: restore PostgreSQL physical backups from Kopia repositories, verify and serve them."""

__version__ = "0.1.0"
