"""The consortium: one node per organisation, ordered by etcd, talking over a peer API.

* :mod:`~medledger.consortium.config`: ``node.toml`` (what one organisation's node runs)
* :mod:`~medledger.consortium.auth`: node-key signatures on inter-node requests
* :mod:`~medledger.consortium.peer`: the inter-node HTTP API and its client
* :mod:`~medledger.consortium.gossip`: checkpoint exchange, co-signing, divergence
* :mod:`~medledger.consortium.catchup`: fetching and verifying peers' blocks
* :mod:`~medledger.consortium.process`: one organisation's node process
* :mod:`~medledger.consortium.network`: a local consortium on loopback for trying it out
"""
