"""medledger.orderer."""
