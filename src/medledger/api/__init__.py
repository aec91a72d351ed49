"""medledger.api."""
