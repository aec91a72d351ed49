"""medledger: a permissioned, verifiable ledger for sharing medical records."""

from medledger.errors import MedledgerError

__version__ = "0.1.0"

__all__ = ["MedledgerError", "__version__"]
