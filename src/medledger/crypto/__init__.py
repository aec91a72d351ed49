"""Cryptography for medledger: the only package that touches pyca primitives."""

from medledger.crypto.aead import decrypt, encrypt, generate_record_key, record_aad
from medledger.crypto.hashing import sha256
from medledger.crypto.kem import EncryptionKey, EncryptionPublicKey, unwrap_key, wrap_key
from medledger.crypto.keystore import Identity, Keystore, RetiredKeys
from medledger.crypto.signing import SigningKey, VerifyKey, key_id

__all__ = [
    "EncryptionKey",
    "EncryptionPublicKey",
    "Identity",
    "Keystore",
    "RetiredKeys",
    "SigningKey",
    "VerifyKey",
    "decrypt",
    "encrypt",
    "generate_record_key",
    "key_id",
    "record_aad",
    "sha256",
    "unwrap_key",
    "wrap_key",
]
