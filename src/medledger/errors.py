"""The one exception tree of medledger.

Every error raised across a package boundary is a :class:`MedledgerError`.
Backends (SQLite, PostgreSQL, etcd) translate their native errors into these
classes at the boundary, so callers never see ``sqlite3.Error`` or a gRPC status.

::

    MedledgerError
    ├── EncodingError                 bytes are not canonical / not decodable
    ├── CryptoError
    │   ├── InvalidSignature          a signature does not verify
    │   ├── DecryptionError           any failure to decrypt or unwrap (deliberately opaque)
    │   └── KeystoreError             missing key, wrong passphrase, bad permissions
    ├── ProofError                    an inclusion / consistency proof does not verify
    ├── CheckpointError               a checkpoint or signed note is malformed or unsigned
    ├── TransactionRejected           a transaction was refused; nothing was changed
    │   ├── MalformedTransaction
    │   ├── UnknownTransactionType
    │   ├── WrongNetwork
    │   ├── BadTransactionSignature
    │   ├── UnknownSigner
    │   ├── ReplayedTransaction       sequence number already used (or tx id already on the ledger)
    │   ├── OutOfOrderSequence        sequence number skips ahead
    │   ├── StaleTransaction          time outside the accepted window of the block
    │   └── ContractError             a contract refused the transaction
    │       ├── Unauthorized          the signer may not do this
    │       ├── NotFound              the referenced object does not exist
    │       ├── Conflict              the object already exists / wrong state
    │       └── RuleError             a sharing rule failed to parse, type-check or evaluate
    ├── StorageError                  a backend failed (I/O, constraint, connection)
    │   └── IntegrityError            stored data fails verification
    ├── OrdererError                  ordering service unavailable; nothing was acknowledged
    ├── NotFoundError                 a requested object (block, tx, record) does not exist
    └── RemoteError                   a medledger server answered a client with an error
"""

from __future__ import annotations

from typing import Any


class MedledgerError(Exception):
    """Base class of every error medledger raises on purpose."""

    code: str = "error"

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        self.details = details

    def __str__(self) -> str:
        return self.message


class EncodingError(MedledgerError):
    """Bytes are not in canonical form or cannot be decoded."""

    code = "encoding"


class CryptoError(MedledgerError):
    """A cryptographic operation failed."""

    code = "crypto"


class InvalidSignature(CryptoError):
    """The signature does not verify."""

    code = "invalid-signature"


class DecryptionError(CryptoError):
    """Decryption failed (wrong key, tampered ciphertext or associated data)."""

    code = "decryption"


class KeystoreError(CryptoError):
    """A key could not be loaded or stored."""

    code = "keystore"


class ProofError(MedledgerError):
    """A Merkle proof does not verify."""

    code = "proof"


class CheckpointError(MedledgerError):
    """A checkpoint or signed note is malformed or its signature does not verify."""

    code = "checkpoint"


class TransactionRejected(MedledgerError):
    """The transaction was rejected; the ledger and state are unchanged."""

    code = "rejected"


class MalformedTransaction(TransactionRejected):
    """The transaction envelope is malformed."""

    code = "malformed"


class UnknownTransactionType(TransactionRejected):
    """The transaction type is not known to this network."""

    code = "unknown-type"


class WrongNetwork(TransactionRejected):
    """The transaction names another network."""

    code = "wrong-network"


class BadTransactionSignature(TransactionRejected):
    """The transaction's signature does not verify against its signer key."""

    code = "bad-signature"


class UnknownSigner(TransactionRejected):
    """The signer key is not registered (or no longer active) on this network."""

    code = "unknown-signer"


class ReplayedTransaction(TransactionRejected):
    """The transaction (or its sequence number) was already used."""

    code = "replayed"


class OutOfOrderSequence(TransactionRejected):
    """The sequence number skips ahead of the signer's next expected number."""

    code = "out-of-order"


class StaleTransaction(TransactionRejected):
    """The transaction time is outside the window accepted for the block."""

    code = "stale"


class ContractError(TransactionRejected):
    """A contract refused the transaction."""

    code = "contract"


class Unauthorized(ContractError):
    """The signer is not allowed to perform this action."""

    code = "unauthorized"


class NotFound(ContractError):
    """The referenced object does not exist."""

    code = "not-found"


class Conflict(ContractError):
    """The object already exists or is in the wrong state."""

    code = "conflict"


class RuleError(ContractError):
    """A sharing rule failed to parse, type-check or evaluate within its budget."""

    code = "rule"


class StorageError(MedledgerError):
    """The storage backend failed."""

    code = "storage"


class IntegrityError(StorageError):
    """Stored data failed verification."""

    code = "integrity"


class OrdererError(MedledgerError):
    """The ordering service is unavailable; the transaction was not acknowledged."""

    code = "orderer"


class NotFoundError(MedledgerError):
    """The requested object does not exist."""

    code = "not-found"


class RemoteError(MedledgerError):
    """A medledger server answered :mod:`medledger.client` with an error.

    ``status`` is the HTTP status (0 when there was no answer) and ``outcome`` the
    FHIR OperationOutcome the server sent, if any.
    """

    code = "remote"

    def __init__(
        self, message: str = "", *, status: int = 0, outcome: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.status = status
        self.outcome = outcome
