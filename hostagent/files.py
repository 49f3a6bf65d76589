"""The registry file on disk, as `hostagent` (root) keeps it: its owner and modes (root,
group of the proxy's user, 0640 in a 0750 directory; 0600 and 0700 where that user does
not exist), its atomic creation, and the checks made before SQLite opens it.

Only `host setup` creates the registry's directory: a write to a registry whose directory
does not exist is refused, so a mistyped ``--registry /x/y`` creates nothing.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
import tempfile
from dataclasses import dataclass

from hostagent.errors import RegistryDamaged, StoreError
from metadata_proxy.registry_file import connect_readwrite

PROXY_USER = "metadata-proxy"
SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True, slots=True)
class Access:
    """Owner and modes of the registry: root, plus read access for the proxy's group if it has one."""

    gid: int | None

    @property
    def file_mode(self) -> int:
        return 0o640 if self.gid is not None else 0o600

    @property
    def dir_mode(self) -> int:
        return 0o750 if self.gid is not None else 0o700

    @property
    def umask(self) -> int:
        return 0o027 if self.gid is not None else 0o077


def proxy_access(user: str = PROXY_USER) -> Access:
    """Access for the proxy's user: its primary group, or a group of that name; else root only."""
    try:
        return Access(pwd.getpwnam(user).pw_gid)
    except KeyError:
        pass
    try:
        return Access(grp.getgrnam(user).gr_gid)
    except KeyError:
        return Access(None)


def exists(path: str) -> bool:
    """Whether the registry file exists. A file this user cannot even look for is an error,
    never "no VM registered": a listing must not come out empty for lack of permission."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise StoreError(f"registry {path}: a part of the path is not a directory") from None
    except OSError as exc:
        raise StoreError(f"registry {path}: {exc.strerror} (as {_who()})") from None
    return True


def check_file(path: str) -> None:
    """RegistryDamaged unless the file is empty or starts like an SQLite database;
    StoreError when this user cannot read it."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise RegistryDamaged(f"registry {path}: not a regular file")
        if st.st_size == 0:
            return
        with open(path, "rb") as f:
            header = f.read(len(SQLITE_MAGIC))
    except PermissionError as exc:
        raise StoreError(f"registry {path}: {exc.strerror} (as {_who()})") from None
    except OSError as exc:
        raise RegistryDamaged(f"registry {path}: {exc.strerror}") from None
    if header != SQLITE_MAGIC:
        raise RegistryDamaged(f"registry {path}: not an SQLite database")


def _who() -> str:
    try:
        return f"user {pwd.getpwuid(os.geteuid()).pw_name}"
    except KeyError:
        return f"uid {os.geteuid()}"


def ensure_directory(path: str, access: Access) -> None:
    """Create the registry's directory with its owner and mode if it does not exist yet
    (`host setup`). An existing directory is left as it is: it may be shared (a test's /tmp)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory):
        return
    old = os.umask(access.umask)
    try:
        os.makedirs(directory, mode=access.dir_mode, exist_ok=True)
        own(directory, access, access.dir_mode)
    except OSError as exc:
        raise StoreError(f"registry directory {directory}: {exc.strerror}") from None
    finally:
        os.umask(old)


def require_directory(path: str) -> None:
    """StoreError unless the registry's directory exists: writes never create it."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StoreError(
            f"registry {path}: its directory {directory} does not exist "
            "(check the path; `hostagent host setup` creates the configured one)"
        )


def own(path: str, access: Access, mode: int) -> None:
    """Give `path` its owner (root, the proxy's group) and `mode`, where it differs."""
    st = os.stat(path)
    gid = access.gid if access.gid is not None else os.getegid()
    if (st.st_uid, st.st_gid) != (os.geteuid(), gid):
        os.chown(path, os.geteuid(), gid)
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def create(path: str, access: Access) -> None:
    """Create an empty registry, atomically and with its final owner and mode.

    It is built under a temporary name and hard-linked into place, so a reader never
    sees a half-made file, and a concurrent `hostagent` that won the race is kept.
    SQLite gives a -journal the mode and owner of its database, so the journal of
    every later transaction is as closed as the file itself.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".new", dir=directory)
    try:
        os.close(fd)
        own(tmp, access, access.file_mode)
        connect_readwrite(tmp).close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        for leftover in (tmp, tmp + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
