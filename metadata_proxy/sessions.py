"""Session tokens for routes with guard "session" (AWS IMDSv2 style).

A token is opaque to the guest: ``v1.<expiry>.<nonce>.<mac>``, the expiry in Unix
milliseconds (so a token lives its TTL to the millisecond), where the MAC (HMAC-SHA256
under a key that exists only in this proxy's memory) binds the expiry and nonce to the
VM's registry name and id. Nothing is stored per token, so thousands of VMs cost nothing
and every worker forked from one parent accepts every other's tokens. A restart draws a
new key: every session token issued before it becomes invalid (the README says so).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class SessionTokens:
    def __init__(self, key: bytes | None = None, clock: Callable[[], float] = time.time) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)
        self._clock = clock

    def _mac(self, vm_name: str, vm_id: str, expiry: int, nonce: str) -> str:
        message = f"{vm_name}\0{vm_id}\0{expiry}\0{nonce}".encode()
        return _b64(hmac.digest(self._key, message, hashlib.sha256))

    def issue(self, vm_name: str, vm_id: str, ttl: int) -> str:
        expiry = round((self._clock() + ttl) * 1000)
        nonce = _b64(secrets.token_bytes(12))
        return f"v1.{expiry}.{nonce}.{self._mac(vm_name, vm_id, expiry, nonce)}"

    def valid(self, token: bytes | None, vm_name: str, vm_id: str) -> bool:
        """True when `token` was issued by this proxy to this VM and has not expired."""
        if token is None or len(token) > 200:
            return False
        try:
            version, expiry_text, nonce, mac = token.decode("ascii").split(".")
        except (UnicodeDecodeError, ValueError):
            return False
        if version != "v1" or not expiry_text.isdigit():
            return False
        expiry = int(expiry_text)
        if expiry <= self._clock() * 1000:
            return False
        return hmac.compare_digest(mac, self._mac(vm_name, vm_id, expiry, nonce))
