"""Services: what the CLI and the API call; they drive the node and the contracts."""
