#!/bin/sh
# Check metadata-proxy's systemd files, without installing anything:
#   1. `systemd-analyze verify` on the three units, with no output at all: verify exits 0
#      on unknown keys and unparsable values and only prints a warning, so any line it
#      prints is a failure here;
#   2. `systemd-analyze security --offline=yes` rates metadata-proxy.service at most
#      $MAX_EXPOSURE (default 1.5, what the project promises);
#   3. the sysusers.d and tmpfiles.d files, applied to a scratch root, create the user,
#      the group and the directories with the intended owner and mode.
# Every check runs, and all failures are reported; exit 0 when all passed, 1 otherwise.
#
# Usage: systemd/verify.sh [DIR]   (DIR holds the files, default: this script's directory)
#
# Nothing outside a temporary directory is read or written: the units are verified in a
# scratch root (`systemd-analyze verify --root=`) laid out as the Debian package installs
# them, /usr/lib/systemd/system, with stand-ins for the programs their Exec lines name
# (verify checks that those exist and are executable; that the package really ships them
# is tests/test_package.py's business, on the installed package).
# Works with systemd 250 and newer (--offline and --threshold appeared in 250).
set -u

dir=${1:-$(dirname "$0")}
dir=$(cd "$dir" && pwd) || exit 1
max_exposure=${MAX_EXPOSURE:-1.5}
failed=0

fail() {
    echo "FAIL: $*" >&2
    failed=1
}

systemd-analyze --version | head -n 1

# --- 1. unit files ------------------------------------------------------------------------
root=$(mktemp -d) || exit 1
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/etc" "$root/usr/lib/systemd/system"
# The programs the units run: the package's entry points, and the shell of ExecReload=.
for program in /usr/bin/metadata-proxy /usr/bin/hostagent /bin/sh; do
    mkdir -p "$root$(dirname "$program")"
    printf '#!/bin/sh\n' >"$root$program"
    chmod 0755 "$root$program"
done
for unit in metadata-proxy.socket metadata-proxy.service metadata-proxy-host.service; do
    cp "$dir/$unit" "$root/usr/lib/systemd/system/$unit"
done
units="$root/usr/lib/systemd/system/metadata-proxy.socket $root/usr/lib/systemd/system/metadata-proxy.service"
units="$units $root/usr/lib/systemd/system/metadata-proxy-host.service"
# --recursive-errors=no: judge our units only, not whatever else they name
# (sysinit.target, nftables.service, ...).
# shellcheck disable=SC2086  # word splitting of $units is intended
if out=$(systemd-analyze verify --man=no --recursive-errors=no --root="$root" $units 2>&1) && [ -z "$out" ]; then
    echo "ok: systemd-analyze verify (socket, service, host oneshot)"
else
    fail "systemd-analyze verify:"
    printf '%s\n' "$out" | sed "s|$root||g" >&2
fi

# --- 2. exposure rating -------------------------------------------------------------------
# --threshold counts in tenths (1.5 -> 15) and makes systemd-analyze itself exit non-zero
# above it. The printed rating is parsed as well, to report it and to catch a version that
# ignored the threshold. (--json=short lists the individual checks but not the overall
# rating, so the text line is the one to parse.)
threshold=$(awk -v m="$max_exposure" 'BEGIN { printf "%d", m * 10 + 0.5 }')
out=$(systemd-analyze security --offline=yes --threshold="$threshold" --no-pager "$dir/metadata-proxy.service" 2>&1)
rc=$?
rating=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for metadata-proxy\.service: \([0-9.]*\).*/\1/p')
if [ -z "$rating" ]; then
    fail "systemd-analyze security printed no rating (exit $rc):"
    printf '%s\n' "$out" >&2
elif [ "$rc" -ne 0 ] || awk -v r="$rating" -v m="$max_exposure" 'BEGIN { exit !(r > m) }'; then
    fail "metadata-proxy.service exposure $rating is above $max_exposure (exit $rc); the checks that cost:"
    # The checks with a cost are the lines that end in a number (✗ or -, by locale).
    printf '%s\n' "$out" | grep -E ' [0-9]+\.[0-9]+$' >&2
else
    echo "ok: metadata-proxy.service exposure $rating <= $max_exposure"
fi

# --- 3. sysusers.d and tmpfiles.d, in a scratch root --------------------------------------
# (the scratch root of step 1; sysusers locks $root/etc/passwd and needs the directory)
if ! out=$(systemd-sysusers --root="$root" "$dir/metadata-proxy.sysusers.conf" 2>&1); then
    fail "systemd-sysusers:"
    printf '%s\n' "$out" >&2
elif ! out=$(systemd-tmpfiles --root="$root" --create "$dir/metadata-proxy.tmpfiles.conf" 2>&1); then
    fail "systemd-tmpfiles:"
    printf '%s\n' "$out" >&2
else
    gid=$(awk -F: '$1 == "metadata-proxy" { print $3 }' "$root/etc/group")
    user=$(awk -F: '$1 == "metadata-proxy" { print $4 ":" $6 ":" $7 }' "$root/etc/passwd")
    registry=$(stat -c '%a %u %g' "$root/var/lib/metadata-proxy" 2>/dev/null)
    config=$(stat -c '%a %u %g' "$root/etc/metadata-proxy" 2>/dev/null)
    if [ -z "$gid" ] || [ "$user" != "$gid:/nonexistent:/usr/sbin/nologin" ]; then
        fail "sysusers: user/group metadata-proxy not as intended (group id '$gid', user '$user')"
    elif [ "$registry" != "750 0 $gid" ]; then
        fail "tmpfiles: /var/lib/metadata-proxy is '$registry', want '750 0 $gid' (root:metadata-proxy 0750)"
    elif [ "$config" != "755 0 0" ]; then
        fail "tmpfiles: /etc/metadata-proxy is '$config', want '755 0 0'"
    else
        echo "ok: sysusers.d and tmpfiles.d (user and group metadata-proxy, /var/lib/metadata-proxy root:metadata-proxy 0750)"
    fi
fi

exit "$failed"
