"""An on-disk keystore of identities.

An identity has a name, an Ed25519 signing key, an X25519 encryption key and
optionally a hybrid post-quantum ML-KEM-768+X25519 encryption key. Each identity
is one JSON file ``<dir>/<name>.json`` (mode 0600, directory mode 0700),
written atomically (temporary file, fsync, rename, fsync of the directory).

File format (``"format": 1``; binary fields are standard base64)::

    {
      "format": 1,
      "name": "clinic-a",
      "created": 1700000000,          # Unix seconds, identity creation
      "activated": 1700000000,        # Unix seconds, current keys became current
      "public": {"signing": b64, "encryption": b64, "pq_encryption": b64 | null},
      "history": [                    # retired key sets, oldest first
        {"signing": b64, "encryption": b64, "pq_encryption": b64 | null,
         "activated": int, "retired": int}
      ],
      "secret": {"protection": "none", "plaintext": b64}
             |  {"protection": "scrypt-aes-256-gcm",
                 "kdf": {"name": "scrypt", "n": int, "r": int, "p": int, "salt": b64},
                 "ciphertext": b64}
    }

The secret is the canonical CBOR of ``{"signing": seed, "encryption": raw,
"pq_encryption": raw | null, "retired_encryption": [[alg, raw], ...]}``.
With a passphrase it is encrypted with :mod:`medledger.crypto.aead` under a
key derived by scrypt (default n=2**17, r=8, p=1, 16-byte random salt), and
the associated data is the canonical CBOR of every other field of the file, so
editing the public keys, history, timestamps or KDF parameters of an encrypted
file is detected ("wrong passphrase or corrupted key file").

Rotation (:meth:`Keystore.rotate`) replaces the signing key and the encryption
key(s). The retired *public* keys go to ``history`` with their retirement
time, so signatures made before the rotation stay verifiable; the retired
*private* encryption keys are kept (inside the secret) so that record keys
wrapped to them can still be unwrapped. Retired signing keys are discarded.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
import tempfile
import time
import unicodedata
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from medledger.crypto import aead
from medledger.crypto.kem import ENCRYPTION_ALGS, EncryptionKey, EncryptionPublicKey
from medledger.crypto.signing import ALG_MLKEM768_X25519, ALG_X25519, SigningKey, VerifyKey
from medledger.encoding import decode, encode
from medledger.errors import CryptoError, DecryptionError, EncodingError, KeystoreError

__all__ = [
    "FORMAT_VERSION",
    "SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "WRONG_PASSPHRASE",
    "Identity",
    "Keystore",
    "RetiredKeys",
]

FORMAT_VERSION = 1
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
SALT_SIZE = 16
WRONG_PASSPHRASE = "wrong passphrase or corrupted key file"

_MAX_SCRYPT_MEMORY = 1 << 30  # 128 * n * r * p bytes; refuse files asking for more
_MAX_SCRYPT_R = 32
_MAX_SCRYPT_P = 16
_MAX_FILE_SIZE = 16 << 20
_PROTECTION_NONE = "none"
_PROTECTION_SCRYPT = "scrypt-aes-256-gcm"
_AAD_DOMAIN = "medledger/keystore/v1"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DIR_MODE = 0o700
_FILE_MODE = 0o600


def _unix_now() -> int:
    return int(time.time())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class RetiredKeys:
    """A key set that was current from ``activated`` until ``retired`` (Unix seconds)."""

    signing: VerifyKey
    encryption: EncryptionPublicKey
    pq_encryption: EncryptionPublicKey | None
    activated: int
    retired: int

    def public_record(self) -> dict[str, Any]:
        return {
            "signing": _signing_record(self.signing),
            "encryption": _encryption_records(self.encryption, self.pq_encryption),
            "activated": self.activated,
            "retired": self.retired,
        }


def _signing_record(key: VerifyKey) -> dict[str, Any]:
    return {"alg": "ed25519", "key_id": key.key_id.hex(), "public_key": _b64(key.raw)}


def _encryption_records(
    key: EncryptionPublicKey, pq: EncryptionPublicKey | None
) -> list[dict[str, Any]]:
    keys = [key] if pq is None else [key, pq]
    return [{"alg": k.alg_name, "key_id": k.key_id.hex(), "public_key": _b64(k.raw)} for k in keys]


@dataclass
class Identity:
    """A named identity: current private keys plus the public keys it used before."""

    name: str
    signing: SigningKey
    encryption: EncryptionKey
    pq_encryption: EncryptionKey | None = None
    #: Unix seconds when the identity was created.
    created: int = 0
    #: Unix seconds when the current keys became current.
    activated: int = 0
    #: Retired key sets, oldest first.
    history: list[RetiredKeys] = field(default_factory=list)
    #: Private halves of retired encryption keys, kept to unwrap old record keys.
    retired_encryption: list[EncryptionKey] = field(default_factory=list, repr=False)

    @property
    def key_id(self) -> bytes:
        """The key id of the current signing key."""
        return self.signing.key_id

    def public_keys(self) -> list[VerifyKey]:
        """Every signing public key this identity ever used, oldest first, current last."""
        return [h.signing for h in self.history] + [self.signing.public]

    def encryption_public_keys(self) -> list[EncryptionPublicKey]:
        """Every encryption public key this identity ever used, oldest first, current last."""
        keys: list[EncryptionPublicKey] = []
        for h in self.history:
            keys.append(h.encryption)
            if h.pq_encryption is not None:
                keys.append(h.pq_encryption)
        keys.append(self.encryption.public)
        if self.pq_encryption is not None:
            keys.append(self.pq_encryption.public)
        return keys

    def verify_key(self, key_id: bytes) -> VerifyKey:
        """The (current or retired) signing public key with ``key_id``."""
        for key in self.public_keys():
            if key.key_id == key_id:
                return key
        raise KeystoreError(f"identity {self.name!r} has no signing key {key_id.hex()}")

    def decryption_key(self, key_id: bytes) -> EncryptionKey:
        """The (current or retired) private encryption key with ``key_id``."""
        current = [self.encryption]
        if self.pq_encryption is not None:
            current.append(self.pq_encryption)
        for key in current + self.retired_encryption:
            if key.key_id == key_id:
                return key
        raise KeystoreError(f"identity {self.name!r} has no encryption key {key_id.hex()}")

    def public_record(self) -> dict[str, Any]:
        """Public keys, key ids and history only; JSON-serialisable."""
        pq = None if self.pq_encryption is None else self.pq_encryption.public
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "created": self.created,
            "activated": self.activated,
            "signing": _signing_record(self.signing.public),
            "encryption": _encryption_records(self.encryption.public, pq),
            "history": [h.public_record() for h in self.history],
        }


# --------------------------------------------------------------------------- parsing


class _Malformed(Exception):
    """Internal: the key file does not have the expected structure."""


def _field(obj: object, key: str, kind: type[Any] | tuple[type[Any], ...]) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise _Malformed(f"missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _Malformed(f"field {key!r} has the wrong type")
    return value


def _bytes_field(obj: object, key: str) -> bytes:
    text = _field(obj, key, str)
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise _Malformed(f"field {key!r} is not base64") from exc


def _optional_bytes_field(obj: object, key: str) -> bytes | None:
    if isinstance(obj, dict) and obj.get(key, 0) is None:
        return None
    return _bytes_field(obj, key)


def _public_keys(obj: object) -> tuple[VerifyKey, EncryptionPublicKey, EncryptionPublicKey | None]:
    signing = VerifyKey(_bytes_field(obj, "signing"))
    encryption = EncryptionPublicKey(ALG_X25519, _bytes_field(obj, "encryption"))
    pq_raw = _optional_bytes_field(obj, "pq_encryption")
    pq = None if pq_raw is None else EncryptionPublicKey(ALG_MLKEM768_X25519, pq_raw)
    return signing, encryption, pq


def _check_scrypt(n: int, r: int, p: int) -> None:
    if n < 2 or n & (n - 1):
        raise ValueError("scrypt n must be a power of two, at least 2")
    if not 1 <= r <= _MAX_SCRYPT_R or not 1 <= p <= _MAX_SCRYPT_P:
        raise ValueError("scrypt r or p out of range")
    if 128 * n * r * p > _MAX_SCRYPT_MEMORY:
        raise ValueError("scrypt parameters need too much memory")


def _passphrase_bytes(passphrase: object) -> bytes:
    if not isinstance(passphrase, str):
        raise KeystoreError("the passphrase must be a string")
    if not passphrase:
        raise KeystoreError("the passphrase must not be empty")
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


def _derive(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    try:
        return Scrypt(salt=salt, length=aead.KEY_SIZE, n=n, r=r, p=p).derive(passphrase)
    except (ValueError, MemoryError) as exc:
        raise KeystoreError(f"scrypt failed: {exc}") from exc


def _aad(doc: dict[str, Any]) -> bytes:
    """Associated data: every field of the file except the ciphertext itself."""
    header = dict(doc)
    header["secret"] = {k: v for k, v in doc["secret"].items() if k != "ciphertext"}
    try:
        return encode([_AAD_DOMAIN, header])
    except EncodingError as exc:
        raise _Malformed("unexpected value in key file") from exc


# --------------------------------------------------------------------------- keystore


class Keystore:
    """A directory of identity files.

    ``clock`` returns the current time in Unix seconds (injectable for tests).
    ``scrypt_n``/``scrypt_r``/``scrypt_p`` are the cost parameters used when
    *writing* passphrase-protected files (lower them only in tests); files are
    always read with the parameters stored in them.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        clock: Callable[[], int] | None = None,
        scrypt_n: int = SCRYPT_N,
        scrypt_r: int = SCRYPT_R,
        scrypt_p: int = SCRYPT_P,
    ) -> None:
        try:
            _check_scrypt(scrypt_n, scrypt_r, scrypt_p)
        except ValueError as exc:
            raise KeystoreError(str(exc)) from exc
        self.path = Path(path)
        self._clock = clock or _unix_now
        self._scrypt = (scrypt_n, scrypt_r, scrypt_p)
        try:
            self.path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            if not self.path.is_dir():
                raise KeystoreError(f"keystore path {self.path} is not a directory")
            if stat.S_IMODE(self.path.stat().st_mode) != _DIR_MODE:
                os.chmod(self.path, _DIR_MODE)
        except OSError as exc:
            raise KeystoreError(f"cannot use keystore directory {self.path}: {exc}") from exc

    # ---------------------------------------------------------------- public API

    def names(self) -> list[str]:
        """Names of the identities in this keystore, sorted."""
        try:
            entries = list(self.path.iterdir())
        except OSError as exc:
            raise KeystoreError(f"cannot list keystore {self.path}: {exc}") from exc
        return sorted(p.stem for p in entries if p.suffix == ".json" and _NAME_RE.fullmatch(p.stem))

    def create(self, name: str, passphrase: str | None = None, pq: bool = False) -> Identity:
        """Create and store a new identity; refuses to overwrite an existing one.

        With ``passphrase`` the private keys are encrypted on disk. With ``pq``
        the identity also gets an ML-KEM-768+X25519 encryption key.
        """
        file = self._file(name)
        pw = None if passphrase is None else _passphrase_bytes(passphrase)
        if file.exists():
            raise KeystoreError(f"identity {name!r} already exists")
        now = self._now()
        identity = Identity(
            name=name,
            signing=SigningKey.generate(),
            encryption=EncryptionKey.generate(ALG_X25519),
            pq_encryption=EncryptionKey.generate(ALG_MLKEM768_X25519) if pq else None,
            created=now,
            activated=now,
        )
        self._write(identity, pw, replace=False)
        return identity

    def load(self, name: str, passphrase: str | None = None) -> Identity:
        """Load an identity.

        Raises :class:`KeystoreError` if it does not exist, if the file is
        readable by other users, if it is encrypted and no passphrase is given,
        or (message ``"wrong passphrase or corrupted key file"``) if the
        passphrase is wrong or the encrypted file was modified. A passphrase
        given for an unencrypted file is ignored.
        """
        identity, _ = self._read(name, passphrase)
        return identity

    def rotate(self, name: str, passphrase: str | None = None) -> Identity:
        """Replace the signing and encryption keys of ``name``; keep the old ones in history.

        The file keeps its protection: an encrypted file is re-encrypted with the
        same passphrase (fresh salt, this keystore's scrypt parameters).
        """
        old, encrypted = self._read(name, passphrase)
        now = self._now()
        pq_old = old.pq_encryption
        retired = RetiredKeys(
            signing=old.signing.public,
            encryption=old.encryption.public,
            pq_encryption=None if pq_old is None else pq_old.public,
            activated=old.activated,
            retired=now,
        )
        new = Identity(
            name=old.name,
            signing=SigningKey.generate(),
            encryption=EncryptionKey.generate(ALG_X25519),
            pq_encryption=None if pq_old is None else EncryptionKey.generate(ALG_MLKEM768_X25519),
            created=old.created,
            activated=now,
            history=[*old.history, retired],
            retired_encryption=[
                *old.retired_encryption,
                old.encryption,
                *([] if pq_old is None else [pq_old]),
            ],
        )
        pw = _passphrase_bytes(passphrase) if encrypted else None
        self._write(new, pw, replace=True)
        return new

    # ---------------------------------------------------------------- internals

    def _now(self) -> int:
        now = self._clock()
        if isinstance(now, bool) or not isinstance(now, int) or now < 0:
            raise KeystoreError("the keystore clock must return non-negative integer seconds")
        return now

    def _file(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise KeystoreError(
                f"invalid identity name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return self.path / f"{name}.json"

    def _serialize(self, identity: Identity, passphrase: bytes | None) -> bytes:
        def pub(
            s: VerifyKey, e: EncryptionPublicKey, pq: EncryptionPublicKey | None
        ) -> dict[str, Any]:
            return {
                "signing": _b64(s.raw),
                "encryption": _b64(e.raw),
                "pq_encryption": None if pq is None else _b64(pq.raw),
            }

        pq = identity.pq_encryption
        secret = encode(
            {
                "signing": identity.signing.seed(),
                "encryption": identity.encryption.private_bytes(),
                "pq_encryption": None if pq is None else pq.private_bytes(),
                "retired_encryption": [
                    [k.alg, k.private_bytes()] for k in identity.retired_encryption
                ],
            }
        )
        doc: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "name": identity.name,
            "created": identity.created,
            "activated": identity.activated,
            "public": pub(
                identity.signing.public,
                identity.encryption.public,
                None if pq is None else pq.public,
            ),
            "history": [
                {
                    **pub(h.signing, h.encryption, h.pq_encryption),
                    "activated": h.activated,
                    "retired": h.retired,
                }
                for h in identity.history
            ],
        }
        if passphrase is None:
            doc["secret"] = {"protection": _PROTECTION_NONE, "plaintext": _b64(secret)}
        else:
            n, r, p = self._scrypt
            salt = os.urandom(SALT_SIZE)
            doc["secret"] = {
                "protection": _PROTECTION_SCRYPT,
                "kdf": {"name": "scrypt", "n": n, "r": r, "p": p, "salt": _b64(salt)},
            }
            key = _derive(passphrase, salt, n, r, p)
            doc["secret"]["ciphertext"] = _b64(aead.encrypt(key, secret, _aad(doc)))
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")

    def _write(self, identity: Identity, passphrase: bytes | None, *, replace: bool) -> None:
        file = self._file(identity.name)
        data = self._serialize(identity, passphrase)
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{identity.name}.", suffix=".tmp", dir=self.path)
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), _FILE_MODE)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if replace:
                os.replace(tmp, file)
            else:
                try:
                    os.link(tmp, file)  # fails if the name is taken: no silent overwrite
                except FileExistsError:
                    raise KeystoreError(f"identity {identity.name!r} already exists") from None
                os.unlink(tmp)
            tmp = None
            self._fsync_dir()
        except OSError as exc:
            raise KeystoreError(f"cannot write key file {file}: {exc}") from exc
        finally:
            if tmp is not None:
                with suppress(OSError):
                    os.unlink(tmp)

    def _fsync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _read_bytes(self, name: str) -> bytes:
        file = self._file(name)
        try:
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise KeystoreError(f"no identity named {name!r} in {self.path}") from None
        except OSError as exc:
            raise KeystoreError(f"cannot open key file {file}: {exc}") from exc
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise KeystoreError(
                    f"key file {file} is accessible by other users (mode {mode:04o}); expected 0600"
                )
            if st.st_size > _MAX_FILE_SIZE:
                raise KeystoreError(f"key file {file} is too large")
            return fh.read(_MAX_FILE_SIZE + 1)

    def _read(self, name: str, passphrase: str | None) -> tuple[Identity, bool]:
        raw = self._read_bytes(name)
        try:
            doc = json.loads(raw.decode("utf-8"))
            return self._parse(name, doc, passphrase)
        except (_Malformed, CryptoError, UnicodeDecodeError, ValueError) as exc:
            if isinstance(exc, KeystoreError):
                raise
            raise KeystoreError(f"malformed key file for {name!r}: {exc}") from exc

    def _parse(self, name: str, doc: object, passphrase: str | None) -> tuple[Identity, bool]:
        if not isinstance(doc, dict):
            raise _Malformed("not a JSON object")
        if _field(doc, "format", int) != FORMAT_VERSION:
            raise KeystoreError(f"unsupported key file format for {name!r}")
        if _field(doc, "name", str) != name:
            raise _Malformed("the file names another identity")
        created = _field(doc, "created", int)
        activated = _field(doc, "activated", int)
        signing_pub, enc_pub, pq_pub = _public_keys(_field(doc, "public", dict))
        history: list[RetiredKeys] = []
        for entry in _field(doc, "history", list):
            s, e, pq = _public_keys(entry)
            history.append(
                RetiredKeys(
                    s, e, pq, _field(entry, "activated", int), _field(entry, "retired", int)
                )
            )
        secret_obj = _field(doc, "secret", dict)
        protection = _field(secret_obj, "protection", str)
        if protection == _PROTECTION_NONE:
            encrypted = False
            secret = _bytes_field(secret_obj, "plaintext")
        elif protection == _PROTECTION_SCRYPT:
            encrypted = True
            secret = self._decrypt_secret(name, doc, secret_obj, passphrase)
        else:
            raise _Malformed(f"unknown protection {protection!r}")

        try:
            payload = decode(secret)
        except EncodingError as exc:
            raise _Malformed("the private key payload is not canonical CBOR") from exc
        signing = SigningKey.from_seed(_field(payload, "signing", bytes))
        encryption = EncryptionKey(ALG_X25519, _field(payload, "encryption", bytes))
        pq_raw = _field(payload, "pq_encryption", (bytes, type(None)))
        pq_key = None if pq_raw is None else EncryptionKey(ALG_MLKEM768_X25519, pq_raw)
        retired_enc: list[EncryptionKey] = []
        for item in _field(payload, "retired_encryption", list):
            if (
                not isinstance(item, list)
                or len(item) != 2
                or item[0] not in ENCRYPTION_ALGS
                or not isinstance(item[1], bytes)
            ):
                raise _Malformed("bad retired encryption key")
            retired_enc.append(EncryptionKey(item[0], item[1]))

        retired_pubs = {k.public for k in retired_enc}
        history_pubs = {
            k for h in history for k in (h.encryption, h.pq_encryption) if k is not None
        }
        if (
            signing.public != signing_pub
            or encryption.public != enc_pub
            or (None if pq_key is None else pq_key.public) != pq_pub
            or retired_pubs != history_pubs
        ):
            raise KeystoreError(
                f"key file for {name!r} is corrupted: its private and public keys do not match"
            )
        identity = Identity(
            name=name,
            signing=signing,
            encryption=encryption,
            pq_encryption=pq_key,
            created=created,
            activated=activated,
            history=history,
            retired_encryption=retired_enc,
        )
        return identity, encrypted

    def _decrypt_secret(
        self, name: str, doc: dict[str, Any], secret_obj: dict[str, Any], passphrase: str | None
    ) -> bytes:
        if passphrase is None:
            raise KeystoreError(
                f"identity {name!r} is encrypted: a passphrase is required to load it"
            )
        pw = _passphrase_bytes(passphrase)
        kdf = _field(secret_obj, "kdf", dict)
        if _field(kdf, "name", str) != "scrypt":
            raise _Malformed("unknown key derivation function")
        n, r, p = _field(kdf, "n", int), _field(kdf, "r", int), _field(kdf, "p", int)
        salt = _bytes_field(kdf, "salt")
        try:
            _check_scrypt(n, r, p)
        except ValueError as exc:
            raise _Malformed(str(exc)) from exc
        if not 16 <= len(salt) <= 64:
            raise _Malformed("bad scrypt salt length")
        blob = _bytes_field(secret_obj, "ciphertext")
        key = _derive(pw, salt, n, r, p)
        try:
            return aead.decrypt(key, blob, _aad(doc))
        except DecryptionError:
            raise KeystoreError(WRONG_PASSPHRASE) from None
