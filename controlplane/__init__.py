"""What a control plane needs behind metadata-proxy, importable without the proxy.

- ``controlplane.tokens``: runtime tokens (HS256) — ``mint``, ``Verifier``, ``Secrets``, ``fingerprint``.
- ``controlplane.app``: the reference runtime API (``create_app``) and the helpers to build your own
  (``authenticate``, ``error_response``).
- ``controlplane.vms``: the ``--vms`` file (which VMs exist, their scope and metadata).
- ``controlplane.identity``, ``controlplane.tls``: identity tokens (ES256) and mTLS host identity.
- ``controlplane.actions_cache``, ``cache_index``, ``azure_blob``: the GitHub Actions cache service.
- ``controlplane.metadata``: ``GET /runtime/metadata`` with long-poll.
- ``controlplane.cli``: ``controlplane serve | mint | keygen``.
"""
