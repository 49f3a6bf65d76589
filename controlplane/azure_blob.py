"""Azure Blob storage for the Actions cache: SAS URLs signed here, and the few REST calls the control plane makes.

The guest's client uploads and downloads blobs itself, through URLs whose Shared Access
Signature this module computes with the account key (HMAC-SHA256 of the string-to-sign the
Blob service documents; no Azure SDK). Each URL names one blob, grants one permission set
and expires after ``SAS_LIFETIME``. The control plane's own calls (create the container,
put v1 chunks as blocks, commit the block list, read a blob's size, delete a blob) are
authorised the same way: the container call by an account SAS, the rest by a blob SAS.

Errors::

    BlobError           the store answered an unexpected status, or could not be reached
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit

__all__ = ["SAS_LIFETIME", "BlobError", "BlobStore"]

SAS_LIFETIME = 600.0  # seconds: long enough to move a large archive, short enough to be worthless when leaked
SAS_VERSION = "2022-11-02"
# Requests the control plane makes itself; a v1 chunk is at most a few tens of MiB on loopback or in-region.
CALL_TIMEOUT = 60.0


class BlobError(Exception):
    """The blob store answered an unexpected status (``status``) or could not be reached (``status`` 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclass(frozen=True)
class BlobStore:
    """One container of one storage account: ``url`` is the account's endpoint
    (``https://ACCOUNT.blob.core.windows.net`` or Azurite's ``http://127.0.0.1:10000/devstoreaccount1``)."""

    url: str
    account: str
    key: bytes
    container: str = "actions-cache"

    def _sign(self, text: str) -> str:
        return base64.b64encode(hmac.new(self.key, text.encode("utf-8"), hashlib.sha256).digest()).decode()

    def blob_url(self, blob: str) -> str:
        return f"{self.url.rstrip('/')}/{quote(self.container)}/{quote(blob)}"

    @property
    def _protocol(self) -> str:
        """The SAS's `spr`: a store reached over https signs URLs valid over https only, so a
        leaked URL is not usable in clear text either; an http store (Azurite) signs none."""
        return "https" if urlsplit(self.url).scheme == "https" else ""

    def sas_url(self, blob: str, permissions: str, *, now: float | None = None, lifetime: float = SAS_LIFETIME) -> str:
        """A service SAS URL for one blob: ``permissions`` from ``racwd`` (read, add, create, write, delete)."""
        now = time.time() if now is None else now
        # Start a little in the past: the store's clock may run behind ours.
        start, expiry = _iso(now - 300), _iso(now + lifetime)
        resource = f"/blob/{self.account}/{self.container}/{blob}"
        protocol = self._protocol
        # The service SAS string-to-sign of versions 2020-12-06 and later, field by field.
        fields = [permissions, start, expiry, resource, "", "", protocol, SAS_VERSION, "b", "", "", "", "", "", "", ""]
        query = {"sv": SAS_VERSION, "st": start, "se": expiry, "sr": "b", "sp": permissions}
        if protocol:
            query["spr"] = protocol
        query["sig"] = self._sign("\n".join(fields))
        return f"{self.blob_url(blob)}?{urlencode(query)}"

    def _account_sas(self, permissions: str, resource_types: str, now: float) -> str:
        start, expiry = _iso(now - 300), _iso(now + 60)
        protocol = self._protocol
        # The account SAS string-to-sign of versions 2020-12-06 and later.
        fields = [self.account, permissions, "b", resource_types, start, expiry, "", protocol, SAS_VERSION, "", ""]
        query = {"sv": SAS_VERSION, "ss": "b", "srt": resource_types, "sp": permissions, "st": start, "se": expiry}
        if protocol:
            query["spr"] = protocol
        query["sig"] = self._sign("\n".join(fields))
        return urlencode(query)

    def _call(
        self, method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(url)
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(parts.netloc, timeout=CALL_TIMEOUT)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        sent = {"x-ms-version": SAS_VERSION, "Content-Length": str(len(body)), **(headers or {})}
        try:
            connection.request(method, target, body=body, headers=sent)
            response = connection.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        except (OSError, http.client.HTTPException) as exc:
            raise BlobError(f"blob store unreachable: {exc}") from None
        finally:
            connection.close()

    @staticmethod
    def _expect(status: int, expected: tuple[int, ...], what: str) -> None:
        if status not in expected:
            raise BlobError(f"blob store answered {status} to {what}", status)

    def create_container(self) -> bool:
        """Create the container; False if it already existed."""
        url = f"{self.url.rstrip('/')}/{quote(self.container)}?restype=container&"
        status, _, _ = self._call("PUT", url + self._account_sas("c", "c", time.time()))
        self._expect(status, (201, 409), f"creating container {self.container}")
        return status == 201

    def list_blobs(self) -> list[str]:
        """The names of the container's committed blobs (first 5000; for operators and tests)."""
        url = f"{self.url.rstrip('/')}/{quote(self.container)}?restype=container&comp=list&"
        status, _, data = self._call("GET", url + self._account_sas("l", "co", time.time()))
        self._expect(status, (200,), "List Blobs")
        return [name.text or "" for name in ET.fromstring(data).iterfind("./Blobs/Blob/Name")]

    def put_block(self, blob: str, block_id: str, data: bytes) -> None:
        url = self.sas_url(blob, "w", lifetime=120) + "&" + urlencode({"comp": "block", "blockid": block_id})
        status, _, _ = self._call("PUT", url, data)
        self._expect(status, (201,), "Put Block")

    def uncommitted_blocks(self, blob: str) -> list[tuple[str, int]]:
        """(block id, size) of every uncommitted block; empty if the blob has none."""
        url = self.sas_url(blob, "r", lifetime=120) + "&comp=blocklist&blocklisttype=uncommitted"
        status, _, data = self._call("GET", url)
        if status == 404:
            return []
        self._expect(status, (200,), "Get Block List")
        root = ET.fromstring(data)
        blocks = []
        for block in root.iterfind("./UncommittedBlocks/Block"):
            blocks.append((block.findtext("Name") or "", int(block.findtext("Size") or "0")))
        return blocks

    def put_block_list(self, blob: str, block_ids: list[str]) -> None:
        items = "".join(f"<Latest>{block_id}</Latest>" for block_id in block_ids)
        body = f'<?xml version="1.0" encoding="utf-8"?><BlockList>{items}</BlockList>'.encode()
        url = self.sas_url(blob, "w", lifetime=120) + "&comp=blocklist"
        status, _, _ = self._call("PUT", url, body, {"Content-Type": "application/xml"})
        self._expect(status, (201,), "Put Block List")

    def properties(self, blob: str) -> tuple[int, str] | None:
        """The committed blob's (size in bytes, ETag); None if there is no such blob."""
        status, headers, _ = self._call("HEAD", self.sas_url(blob, "r", lifetime=120))
        if status == 404:
            return None
        self._expect(status, (200,), "Get Blob Properties")
        return int(headers.get("content-length", "0")), headers.get("etag", "")

    def size(self, blob: str) -> int | None:
        """The committed blob's size in bytes; None if there is no such blob."""
        found = self.properties(blob)
        return found[0] if found is not None else None

    def delete(self, blob: str) -> None:
        """Delete the blob (committed or not); one that is already gone is not an error."""
        status, _, _ = self._call("DELETE", self.sas_url(blob, "d", lifetime=120))
        self._expect(status, (202, 404), "Delete Blob")
