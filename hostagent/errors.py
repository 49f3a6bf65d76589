"""The errors of registry commands; each message is one line naming the thing and the reason.

StoreError            base: the command failed and changed nothing
├── InvalidEntry      a VM description that breaks a rule (name, address, token, sync line)
├── Conflict          refused by an invariant (address held by another VM, --replace needed)
├── RegistryDamaged   the file exists but is not a registry of ours; it is never replaced
└── PlumbingFailed    the namespace side failed; the registry was left as it was
"""

from __future__ import annotations


class StoreError(Exception):
    """A registry command failed; nothing was changed."""


class InvalidEntry(StoreError):
    """A VM description breaks a rule."""


class Conflict(StoreError):
    """An invariant refuses the change."""


class RegistryDamaged(StoreError):
    """The registry file exists but is not a readable registry of ours."""


class PlumbingFailed(StoreError):
    """The namespace side of a change failed."""
