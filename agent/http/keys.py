"""The HTTP API's bearer keys, shared by every endpoint and swapped whole on reload.

``http.api_key`` acts for every user; each ``http.api_keys`` entry acts for one
``user_id``. The keys live in one attribute holding an immutable tuple, so a
reload replaces them in one step while request threads read them without a lock.
:meth:`ApiKeys.authenticate` is the one place an ``Authorization`` header is read.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from agent.api.errors import ApiError
from agent.config import HttpSettings

__all__ = ["INVALID", "ApiKeys"]


class InvalidKey:
    def __repr__(self) -> str:
        return "INVALID"


INVALID = InvalidKey()
"""What :meth:`ApiKeys.user_of` returns for a key that is none of the configured ones."""


class ApiKeys:
    def __init__(self, admin_key: str, user_keys: Mapping[str, str] | None = None) -> None:
        self._keys = self._build(admin_key, user_keys or {})

    @staticmethod
    def _build(admin_key: str, user_keys: Mapping[str, str]) -> tuple[bytes, tuple[tuple[bytes, str], ...]]:
        return admin_key.encode(), tuple((k.encode(), uid) for k, uid in user_keys.items())

    @staticmethod
    def _from_http(http: HttpSettings) -> tuple[str, dict[str, str]]:
        if http.api_key is None:
            raise ValueError("http.api_key is required")
        users = {k.api_key.get_secret_value(): k.user_id for k in http.api_keys if k.api_key is not None}
        return http.api_key.get_secret_value(), users

    @classmethod
    def from_settings(cls, http: HttpSettings) -> ApiKeys:
        return cls(*cls._from_http(http))

    def replace_from(self, http: HttpSettings) -> None:
        """Swap in the keys of ``http`` (a reload); requests in flight finish with the old ones."""
        self._keys = self._build(*self._from_http(http))

    def user_of(self, token: str) -> str | InvalidKey | None:
        """None for the operator's key, the user_id for a user's key, else ``INVALID``.

        Every key is compared, in constant time, whichever matches: no timing hint.
        """
        admin, users = self._keys
        got = token.encode()
        is_admin = hmac.compare_digest(got, admin)
        found: str | None = None
        for key, uid in users:
            if hmac.compare_digest(got, key):
                found = uid
        if is_admin:
            return None
        return INVALID if found is None else found

    def authenticate(self, authorization: str | None) -> str | None:
        """Who ``Authorization: Bearer <key>`` acts for: None for the operator's key, else the
        key's user_id. 401 (``unauthorized``) when the header is missing, not Bearer, or the key
        is none of ours. The scheme is case-insensitive; surrounding spaces are ignored."""
        if not authorization:
            raise ApiError.one(401, "unauthorized", "missing Authorization header: send 'Bearer <api_key>'")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError.one(401, "unauthorized", "Authorization must be 'Bearer <api_key>'")
        user = self.user_of(token.strip())
        if isinstance(user, InvalidKey):
            raise ApiError.one(401, "unauthorized", "invalid API key")
        return user
