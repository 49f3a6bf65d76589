"""The `hostagent` command line: what the control plane runs on a host (over SSH, as root).

Exit status: 0 done (also "unchanged" and "already absent"), 1 failed with one line on
stderr naming the thing and the reason, 2 usage error. Tokens are read from a file or
stdin only and are never printed: output shows their fingerprint.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

from controlplane.tokens import fingerprint
from hostagent import netns, store
from metadata_proxy.cli_errors import JWT_SHAPE, redact_tokens, report_unexpected
from metadata_proxy.config import DEFAULT_LISTEN, DEFAULT_PATH, DEFAULT_REGISTRY, ConfigError, load_config
from metadata_proxy.registry import VM
from metadata_proxy.version import version

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
MAX_TOKEN_BYTES = 64 * 1024  # a runtime JWT is a few hundred bytes; anything near this is not one


class Failed(Exception):
    """An expected failure of the command; its message is the one stderr line."""


@dataclass(frozen=True, slots=True)
class Settings:
    registry: str
    endpoints: tuple[netns.Endpoint, ...]

    @property
    def reserved(self) -> frozenset[str]:
        """The metadata addresses: where guests find the proxy, never a VM's address."""
        return frozenset(endpoint.address for endpoint in self.endpoints)


def _settings(args: argparse.Namespace) -> Settings:
    """The registry path and the metadata endpoints, from --registry, --config or the default config.

    ``--registry`` means "no config file": the metadata addresses are then the defaults.
    """
    default_endpoints = netns.endpoints_from((entry.host, entry.port) for entry in DEFAULT_LISTEN)
    if args.registry:
        return Settings(args.registry, default_endpoints)
    path = args.config or (DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None)
    if path is None:
        return Settings(DEFAULT_REGISTRY, default_endpoints)
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise Failed(str(exc)) from None
    return Settings(config.registry, netns.endpoints_from((entry.host, entry.port) for entry in config.listen))


# -- presentation ---------------------------------------------------------------------------


def _addresses(vm: VM) -> list[str]:
    return sorted(vm.addresses, key=lambda address: (":" in address, address))  # IPv4 first


def vm_json(vm: VM) -> dict[str, object]:
    """The public shape of a VM (README "The host side"): never the token, only its fingerprint."""
    return {
        "name": vm.name,
        "vm_id": vm.vm_id,
        "addresses": _addresses(vm),
        "netns": vm.netns,
        "token_fingerprint": fingerprint(vm.token),
        "token_exp": vm.token_exp,
    }


def _when(exp: int | None) -> str:
    if exp is None:
        return "-"
    return datetime.datetime.fromtimestamp(exp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dump(value: object) -> None:
    print(json.dumps(value, sort_keys=True, indent=2))


# -- commands -------------------------------------------------------------------------------


def _read_token(source: str) -> str:
    if JWT_SHAPE.fullmatch(source) and not os.path.exists(source):
        # Someone passed the token itself: refuse without echoing it back into a log.
        raise Failed("--token-file names a file (or - for stdin); it looks like a token was given instead")
    try:
        if source == "-":
            text = sys.stdin.read(MAX_TOKEN_BYTES + 1)
        else:
            with open(source, encoding="utf-8") as f:
                text = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise Failed(f"token file {source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise Failed(f"token file {source}: not UTF-8 text") from None
    if len(text) > MAX_TOKEN_BYTES:
        raise Failed(f"token file {source}: larger than {MAX_TOKEN_BYTES} bytes")
    return text.strip()


def cmd_host_setup(args: argparse.Namespace, settings: Settings) -> int:
    changes = netns.host_setup(settings.endpoints)
    store.Store(settings.registry).ensure_directory()
    for line in changes:
        print(line)
    print("host setup: done" if changes else "host setup: unchanged")
    return EXIT_OK


def cmd_vm_add(args: argparse.Namespace, settings: Settings) -> int:
    token = _read_token(args.token_file) if args.token_file is not None else None
    change: store.Entry | store.Change
    if args.replace:
        # What the command names changes; the rest stays as registered.
        netns_change = None if args.no_netns else args.netns if args.netns is not None else store.KEEP
        change = store.make_change(args.name, args.address, token, netns_change, reserved=settings.reserved)
    else:
        assert token is not None and args.address is not None  # checked with the usage
        change = store.make_entry(args.name, args.address, token, args.netns, reserved=settings.reserved)
    put = store.Store(settings.registry).put(change, replace=args.replace, plumber=netns.Plumber(settings.endpoints))
    entry = put.new
    if put.old is None or not put.changed:
        print(f"{entry.name}: {put.outcome} ({', '.join(entry.addresses)}, token {fingerprint(entry.token)})")
    else:
        shown = ", ".join(f"{key} {_field(put.old, key)} -> {_field(put.new.as_vm(), key)}" for key in put.changed)
        print(f"{entry.name}: {put.outcome}: {shown}")
    return EXIT_OK


def _field(vm: VM, key: str) -> str:
    """One field of `vm` as `vm add` shows a change of it (the token by its fingerprint)."""
    if key == "token":
        return fingerprint(vm.token)
    if key == "address":
        return ",".join(_addresses(vm))
    if key == "netns":
        return vm.netns or "-"
    return vm.vm_id


def cmd_vm_apply(args: argparse.Namespace, settings: Settings) -> int:
    report = store.Store(settings.registry).reapply([args.name], netns.Plumber(settings.endpoints))
    if report.missing:
        name, ns = report.missing[0]
        raise Failed(f"VM {name}: netns {ns} does not exist")
    if report.failed:
        name, reason = report.failed[0]
        raise Failed(f"VM {name}: {reason}")
    print(f"{args.name}: table applied")
    return EXIT_OK


def cmd_vm_remove(args: argparse.Namespace, settings: Settings) -> int:
    outcome = store.Store(settings.registry).remove(args.name, plumber=netns.Plumber(settings.endpoints))
    print(f"{args.name}: {'removed' if outcome == 'removed' else 'already absent'}")
    return EXIT_OK


def cmd_vm_list(args: argparse.Namespace, settings: Settings) -> int:
    vms = store.Store(settings.registry).vms()
    if args.json:
        _dump([vm_json(vm) for vm in vms])
        return EXIT_OK
    rows = [("NAME", "VM_ID", "ADDRESSES", "NETNS", "TOKEN", "EXPIRES")]
    rows += [
        (vm.name, vm.vm_id, ",".join(_addresses(vm)), vm.netns or "-", fingerprint(vm.token), _when(vm.token_exp))
        for vm in vms
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([cell.ljust(width) for cell, width in zip(row, widths, strict=False)] + [row[-1]]))
    return EXIT_OK


def cmd_vm_show(args: argparse.Namespace, settings: Settings) -> int:
    vm = store.Store(settings.registry).get(args.name)
    if vm is None:
        raise Failed(f"VM {args.name} is not registered")
    shown = vm_json(vm)
    if args.json:
        _dump(shown)
        return EXIT_OK
    shown["addresses"] = ", ".join(_addresses(vm))
    shown["netns"] = vm.netns or "-"
    shown["token_exp"] = _when(vm.token_exp)
    for key in ("name", "vm_id", "addresses", "netns", "token_fingerprint", "token_exp"):
        print(f"{key + ':':<19}{shown[key]}")
    return EXIT_OK


def cmd_vm_sync(args: argparse.Namespace, settings: Settings) -> int:
    try:
        if args.file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.file, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except OSError as exc:
        raise Failed(f"sync file {args.file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise Failed(f"sync file {args.file}: not UTF-8 text") from None
    try:
        entries = store.parse_sync(lines, reserved=settings.reserved)
    except store.InvalidEntry as exc:
        raise Failed(f"sync file {args.file}: {exc}") from None
    if not entries and not args.allow_empty:
        # An empty set removes every VM: more often a failed export than a wish.
        raise Failed(f"sync file {args.file}: no VM in it; that would remove every VM (--allow-empty to mean it)")
    registry = store.Store(settings.registry)
    if args.dry_run:
        result = registry.sync(entries, dry_run=True)
        for mark, names in (("add", result.added), ("replace", result.replaced), ("remove", result.removed)):
            for name in names:
                fields = result.fields.get(name)
                print(f"would {mark} {name}" + (f" ({', '.join(fields)})" if fields else ""))
        print(
            f"sync (dry run, nothing changed): {len(result.added)} to add, {len(result.replaced)} to replace, "
            f"{len(result.removed)} to remove, {result.unchanged} unchanged"
        )
        return EXIT_OK
    result = registry.sync(entries, plumber=netns.Plumber(settings.endpoints))
    print(
        f"sync: {len(result.added)} added, {len(result.replaced)} replaced, "
        f"{len(result.removed)} removed, {result.unchanged} unchanged"
    )
    for name, reason in result.failed:
        print(f"hostagent: VM {name}: plumbing failed: {reason}", file=sys.stderr)
    return EXIT_FAILED if result.failed else EXIT_OK


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    report = store.Store(settings.registry).reapply(None, netns.Plumber(settings.endpoints))
    for name, ns in report.missing:
        print(f"{name}: netns {ns} is missing")
    print(f"reconcile: {len(report.applied)} applied, {len(report.missing)} missing, {len(report.failed)} failed")
    for name, reason in report.failed:
        print(f"hostagent: VM {name}: {reason}", file=sys.stderr)
    if report.failed:
        return EXIT_FAILED
    if report.missing and args.strict:
        print(f"hostagent: reconcile: {len(report.missing)} VM namespace(s) missing (--strict)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# -- parsing --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error never echoes something shaped like a token."""

    def error(self, message: str) -> NoReturn:
        super().error(redact_tokens(message))


def _command(group: argparse._SubParsersAction[_Parser], name: str, what: str) -> _Parser:
    # No abbreviations: "--token TOKEN" must be a usage error, never a shortening of --token-file.
    return group.add_parser(name, help=what, description=what, allow_abbrev=False)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hostagent", description="Host side of metadata-proxy: registry and plumbing.", allow_abbrev=False
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="FILE", help=f"proxy config (default {DEFAULT_PATH} if it exists)")
    source.add_argument("--registry", metavar="FILE", help="registry file, default metadata addresses, no config")
    parser.add_argument("--version", action="version", version=f"hostagent {version()}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{host,vm,reconcile}")

    host = _command(commands, "host", "host-wide plumbing").add_subparsers(dest="action", required=True)
    setup = _command(host, "setup", "metadata addresses, host nftables table, registry directory (idempotent)")
    setup.set_defaults(run=cmd_host_setup)

    vm = _command(commands, "vm", "VM registry and per-VM plumbing").add_subparsers(dest="action", required=True)
    add = _command(vm, "add", "register a VM (and install its table with --netns)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--address", action="append", metavar="ADDR", help="one IPv4 and/or one IPv6")
    add.add_argument("--token-file", metavar="FILE", help="file holding the token, - for stdin")
    where = add.add_mutually_exclusive_group()
    where.add_argument("--netns", metavar="NS", help="the VM's network namespace")
    where.add_argument("--no-netns", action="store_true", help="with --replace: the VM leaves its namespace")
    add.add_argument(
        "--replace", action="store_true", help="change what is named (token, address, netns) and keep the rest"
    )
    add.set_defaults(run=cmd_vm_add)
    for name, run, what in (
        ("apply", cmd_vm_apply, "re-install a VM's table in its namespace"),
        ("remove", cmd_vm_remove, "unregister a VM and remove its table"),
    ):
        sub = _command(vm, name, what)
        sub.add_argument("name", metavar="NAME")
        sub.set_defaults(run=run)
    listing = _command(vm, "list", "registered VMs")
    listing.add_argument("--json", action="store_true", help="a JSON array")
    listing.set_defaults(run=cmd_vm_list)
    show = _command(vm, "show", "one registered VM")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="a JSON object")
    show.set_defaults(run=cmd_vm_show)
    sync = _command(vm, "sync", "converge the registry to a complete set (JSON lines)")
    sync.add_argument("file", metavar="FILE", help="JSON lines file, - for stdin")
    sync.add_argument("--dry-run", action="store_true", help="print what would change; change nothing")
    sync.add_argument("--allow-empty", action="store_true", help="accept an empty set (removes every VM)")
    sync.set_defaults(run=cmd_vm_sync)

    reconcile = _command(commands, "reconcile", "re-apply every VM's table; list missing namespaces")
    reconcile.add_argument("--strict", action="store_true", help="exit 1 when a namespace is missing")
    reconcile.set_defaults(run=cmd_reconcile)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "run", None) is cmd_vm_add and not args.replace:
            missing = [
                option
                for option, value in (("--address", args.address), ("--token-file", args.token_file))
                if not value
            ]
            if missing:
                parser.error(f"vm add: {' and '.join(missing)} required (only --replace may leave them out)")
        if getattr(args, "run", None) is cmd_vm_add and args.no_netns and not args.replace:
            parser.error("vm add: --no-netns goes with --replace")
    except SystemExit as exc:  # argparse exits 2 on a usage error, 0 for --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.run(args, _settings(args)))
    except (Failed, store.StoreError, netns.NetnsError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted")
    except Exception as exc:  # a bug: one line, the traceback kept (never a token in either)
        return report_unexpected("hostagent", exc, debug=args.debug)
    return EXIT_FAILED


def _fail(message: str) -> None:
    # A token pasted into the wrong field (a name, an address) must not come back out here.
    print(f"hostagent: {redact_tokens(' '.join(message.split()))}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
