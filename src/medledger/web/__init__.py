"""medledger.web."""
