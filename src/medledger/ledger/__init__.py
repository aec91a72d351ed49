"""medledger.ledger."""
