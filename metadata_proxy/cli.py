"""`metadata-proxy`: serve, check-config, demo.

Exit codes: 0 ok, 1 failed (one line on stderr naming the thing and the reason), 2 usage.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import uvloop

from . import systemd
from .cli_errors import report_unexpected
from .config import DEFAULT_PATH, Config, ConfigError, ControlPlane, ListenAddress, check_input_files, load_config
from .logs import AccessLog, setup_logging
from .version import version

# Not imported here: .server (and, through it, prometheus_client). cmd_serve first decides
# where metric values live; see `_metrics_storage`.

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
SERVICE_USER = "metadata-proxy"  # the unit's User=, made by the package's sysusers.d file


def _fail(message: str) -> int:
    print(f"metadata-proxy: {message}", file=sys.stderr, flush=True)
    return EXIT_FAILED


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    # The files are read by the service's user, not by whoever runs this (root, usually).
    user = args.user if args.user is not None else _existing_user(SERVICE_USER)
    check_input_files(config, user=user)
    routes = ", ".join(f"{route.prefix} ({route.guard})" for route in config.routes)
    readable = f", files readable by {user}" if user is not None else ""
    print(
        f"{args.config}: ok: host_id {config.host_id}, {len(config.listen)} listen address(es), routes {routes}"
        f"{readable}"
    )
    return EXIT_OK


def _existing_user(name: str) -> str | None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return None
    return name


def _metrics_storage(workers: int) -> str | None:
    """Where metric values live, decided before anything imports prometheus_client, which
    reads PROMETHEUS_MULTIPROC_DIR once, at import: in the process for one worker; with
    several, in files under a new private directory that every worker inherits and the
    admin endpoint sums (removed by cmd_serve at exit). Returns that directory, or None."""
    if workers == 1:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return None
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the metrics storage was chosen")
    path = tempfile.mkdtemp(prefix="metadata-proxy-metrics-")  # under PrivateTmp= in the unit
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    check_input_files(config)
    setup_logging(syslog_prefix=systemd.connected_to_journal(os.environ, sys.stdout))
    metrics_dir = _metrics_storage(config.workers)
    admin: socket.socket | None = None
    try:
        from . import server, workers  # only now: see _metrics_storage

        guest, admin = server.open_sockets(config, os.environ)
        admin_path = server.unix_path(admin)
        notifier = systemd.Notifier.from_environ(os.environ)
        if metrics_dir is not None:
            supervisor = workers.Supervisor(
                config,
                config_path=args.config,
                guest_sockets=guest,
                admin_socket=admin,
                notifier=notifier,
                metrics_dir=metrics_dir,
            )
            return supervisor.run()
        proxy = server.ProxyServer(
            config, config_path=args.config, guest_sockets=guest, admin_socket=admin, notifier=notifier
        )
        uvloop.run(proxy.run())
        return EXIT_OK
    finally:
        if admin is not None:  # after a stop, and after a start that failed once it was bound
            admin.close()
            server.remove_socket_file(admin_path)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


# -- demo ---------------------------------------------------------------------------------


def _script(name: str) -> list[str]:
    """Our sibling console script, or `python -m` of its module when not installed as one."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(beside, os.X_OK):
        return [beside]
    return [sys.executable, "-m", f"{name}.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(port: int, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the reference control plane exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the reference control plane did not start listening within 10 s")


def cmd_demo(args: argparse.Namespace) -> int:
    """The reference control plane and the proxy on loopback, one VM registered for 127.0.0.1."""
    from controlplane import tokens  # the demo plays the control plane's part

    from .server import ProxyServer, bind_admin, bind_listen

    workdir = tempfile.mkdtemp(prefix="metadata-proxy-demo-")
    control_plane: subprocess.Popen[bytes] | None = None
    try:
        secret_file = os.path.join(workdir, "secret")
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())
        cp_port = _free_port()
        control_plane = subprocess.Popen(
            [*_script("controlplane"), "serve", "--listen", f"127.0.0.1:{cp_port}", "--secret-file", secret_file],
            stdin=subprocess.DEVNULL,
            # Its own session: Ctrl-C reaches the demo alone, which then stops it in order.
            start_new_session=True,
        )
        _wait_listening(cp_port, control_plane, time.monotonic() + 10)

        # What the control plane does when it creates a VM: mint its token, hand it to the
        # host with `hostagent vm add` (token on stdin, never on a command line).
        registry = os.path.join(workdir, "registry.sqlite3")
        token = tokens.mint("demo-vm-0001", tokens.load_secret_spec(secret_file))
        subprocess.run(
            [
                *_script("hostagent"),
                "--registry",
                registry,
                "vm",
                "add",
                "demo",
                "--address",
                "127.0.0.1",
                "--token-file",
                "-",
            ],
            input=token.encode(),
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=30,
        )

        guest = bind_listen(ListenAddress("127.0.0.1", 0))
        port = guest.getsockname()[1]
        config = Config(
            host_id="demo-host",
            control_plane=ControlPlane(url=f"http://127.0.0.1:{cp_port}", timeout=10, retry_budget=2),
            listen=(ListenAddress("127.0.0.1", port),),
            registry=registry,
            admin_listen=os.path.join(workdir, "admin.sock"),
            source="<demo>",
        )
        setup_logging(sys.stderr)
        server = ProxyServer(
            config,
            config_path=None,
            guest_sockets=[guest],
            admin_socket=bind_admin(config.admin_listen),
            notifier=systemd.Notifier.from_environ({}),
            access_log=AccessLog(sys.stderr),
            on_ready=lambda: print(f"curl -s -H 'Metadata: true' http://127.0.0.1:{port}/runtime/whoami", flush=True),
        )
        print(
            f"metadata-proxy demo: control plane on 127.0.0.1:{cp_port}, proxy on 127.0.0.1:{port}, "
            f"admin on {config.admin_listen}; Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
        uvloop.run(server.run())
        return EXIT_OK
    finally:
        if control_plane is not None:
            control_plane.terminate()
            try:
                control_plane.wait(timeout=10)
            except subprocess.TimeoutExpired:
                control_plane.kill()
        shutil.rmtree(workdir, ignore_errors=True)


# -- entry point --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metadata-proxy", allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"metadata-proxy {version()}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, func, text in (
        ("serve", cmd_serve, "serve guests and the admin endpoint"),
        ("check-config", cmd_check_config, "validate the config and the files it names"),
    ):
        sub = commands.add_parser(name, allow_abbrev=False, help=text)
        sub.add_argument("--config", default=DEFAULT_PATH, metavar="FILE", help=f"default {DEFAULT_PATH}")
        sub.set_defaults(func=func)
        if name == "check-config":
            sub.add_argument(
                "--user",
                metavar="USER",
                help=f"check that USER can read the files (default {SERVICE_USER}, when that user exists)",
            )
    demo = commands.add_parser("demo", help="the reference control plane and the proxy on loopback")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}")
    except (RuntimeError, ValueError, subprocess.SubprocessError, systemd.SystemdError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # a bug: one line, and the traceback kept (serve's stderr is the journal)
        return report_unexpected("metadata-proxy", exc, debug=args.debug or args.command == "serve")


if __name__ == "__main__":
    sys.exit(main())
