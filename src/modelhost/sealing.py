"""Sealing: the secrets of models added through the admin API, encrypted with the
deployment's secret key (`MODELHOST_SECRET_KEY`) so that the state database can hold them
and every gateway that has the key can read them (docs/configuration.md, "Secret key").

The key is any text of at least `MIN_KEY_LENGTH` characters (`openssl rand -base64 32`
makes a good one); like LiteLLM's salt key it is not used as is but derived, with HKDF-SHA256
(RFC 5869), into a 256-bit AES key and, separately, a short key id. The key's strength is
its own randomness: HKDF does not stretch a weak password.

Changing the key (`Sealer(key, fallbacks)`): a value sealed with one of the fallback keys
(`MODELHOST_SECRET_KEY_FALLBACKS`) still opens, and `sealed_with_fallback` tells the caller to
seal it again with the key.

A sealed value is text: `mh1.<key id>.<base64url(nonce | ciphertext | tag)>`, AES-256-GCM
with a random 96-bit nonce, and the model's id as associated data, so that a value copied
onto another model's row does not open. The key id says whether a value was sealed with this
key at all: `WrongKey` (another key) is told apart from `Tampered` (this key, but the bytes
were changed or belong to another model), and neither says anything about the key itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Final

MIN_KEY_LENGTH: Final = 32
PREFIX: Final = "mh1"
NONCE_BYTES: Final = 12
_SALT: Final = b"modelhost secret key"
_KEY_INFO: Final = b"modelhost model secrets: AES-256-GCM key, v1"
_ID_INFO: Final = b"modelhost model secrets: key id, v1"


class SealError(ValueError):
    """A sealed value that cannot be opened; the message says why, never a secret."""


class WrongKey(SealError):
    """Sealed with another secret key (its id is not this key's)."""


class Tampered(SealError):
    """Sealed with this key, but changed since (or moved from another model's row)."""


class Malformed(SealError):
    """Not a sealed value of this format."""


def _derive(key: str, info: bytes, length: int) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT,
                info=info).derive(key.encode("utf-8"))


class Sealer:
    """Seals and opens JSON-like values with one secret key; opens with `fallbacks` too
    (earlier keys, while values sealed with them are sealed again)."""

    def __init__(self, key: str, fallbacks: tuple[str, ...] = ()) -> None:
        for text in (key, *fallbacks):
            if len(text) < MIN_KEY_LENGTH:
                raise ValueError(f"the secret key must be at least {MIN_KEY_LENGTH} "
                                 "characters (e.g. the output of `openssl rand -base64 32`)")
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError as exc:  # a dependency of modelhost: a broken install
            raise ValueError("sealing secrets needs the `cryptography` package: "
                             "pip install cryptography") from exc
        self._aead = AESGCM(_derive(key, _KEY_INFO, 32))
        self.key_id = _derive(key, _ID_INFO, 4).hex()
        self._fallbacks = {_derive(text, _ID_INFO, 4).hex(): AESGCM(_derive(text, _KEY_INFO, 32))
                           for text in fallbacks}
        self._fallbacks.pop(self.key_id, None)

    def sealed_with_fallback(self, sealed: str) -> bool:
        """Whether a value is sealed with a fallback key (to be sealed again with the key)."""
        parts = sealed.split(".")
        return len(parts) == 3 and parts[1] in self._fallbacks

    def __repr__(self) -> str:
        return f"Sealer(key_id={self.key_id!r})"

    def seal(self, model_id: str, value: object) -> str:
        plain = json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plain, _aad(model_id))
        text = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")
        return f"{PREFIX}.{self.key_id}.{text}"

    def open(self, model_id: str, sealed: str) -> object:
        """The value sealed for `model_id`; raises a `SealError` saying why it cannot."""
        from cryptography.exceptions import InvalidTag

        parts = sealed.split(".")
        if len(parts) != 3 or parts[0] != PREFIX:
            raise Malformed("not a value sealed by this version of modelhost")
        aead = self._aead if parts[1] == self.key_id else self._fallbacks.get(parts[1])
        if aead is None:
            raise WrongKey(f"sealed with another secret key (key id {parts[1]}; this "
                           f"gateway's key has id {self.key_id})")
        try:
            raw = base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
        except (binascii.Error, ValueError):
            raise Malformed("the sealed value is not valid base64") from None
        if len(raw) < NONCE_BYTES + 16:
            raise Malformed("the sealed value is too short")
        try:
            plain = aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _aad(model_id))
        except InvalidTag:
            raise Tampered("the sealed value was changed, or belongs to another model: it "
                           "does not authenticate with this key") from None
        try:
            return json.loads(plain)
        except ValueError:  # cannot happen for a value this class sealed
            raise Malformed("the opened value is not JSON") from None


def _aad(model_id: str) -> bytes:
    return b"modelhost model secrets of " + model_id.encode("utf-8")
