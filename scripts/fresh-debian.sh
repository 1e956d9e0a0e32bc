#!/usr/bin/env bash
# Check the README's two commands on a fresh Debian (docs/fresh-machine.md).
#
#   bash scripts/fresh-debian.sh demo|test [WORKDIR]
#
# As root: a debootstrap bookworm (minbase: no python3, no sudo, nothing
# running) under WORKDIR (default /tmp/fresh-debian), the working tree copied
# into its /root/transferd, then `bash scripts/demo.sh` (until a sample
# product is delivered through curl) or `bash scripts/test.sh`, chrooted, in
# new PID, mount and network namespaces.  The network namespace has only
# loopback, so the chroot's MariaDB and RabbitMQ never meet the host's; its
# only way out is an HTTP proxy on 127.0.0.1:3128 that reaches, through a
# unix socket, a proxy on the host which connects to the package registries
# (the Debian mirror debootstrap chose, PyPI) and nowhere else.  Slow
# (minutes): not part of the test suite.
set -euo pipefail
what=${1:?usage: fresh-debian.sh demo|test [WORKDIR]}
work=${2:-/tmp/fresh-debian}
here=${TRANSFERD_TREE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
base="$work/bookworm"
root="$work/$what"
sock="$work/proxy.sock"

read -r -d '' PROXY <<'EOF' || true
import asyncio, sys
ALLOWED = set(sys.argv[3:])  # the registries' host names

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()

async def registry(reader, writer):
    """Host side: HTTP CONNECT, or a plain http:// request, to an allowed registry host only."""
    try:
        head = await reader.readuntil(b"\r\n")
    except asyncio.IncompleteReadError:  # a probe that only connected
        writer.close()
        return
    method, target, _ = head.decode("latin-1").split(" ", 2)
    if method == "CONNECT":
        host, port = target.rsplit(":", 1)
    else:
        host, port = target.split("/")[2], "80"
    if host not in ALLOWED or port not in ("80", "443"):
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        writer.close()
        return
    up_reader, up_writer = await asyncio.open_connection(host, int(port))
    if method == "CONNECT":
        while (await reader.readuntil(b"\r\n")) != b"\r\n":
            pass
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    else:
        up_writer.write(head)
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

async def inside(reader, writer):
    """Namespace side: 127.0.0.1:3128 to the host's unix socket."""
    up_reader, up_writer = await asyncio.open_unix_connection(sys.argv[2])
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

async def main():
    if sys.argv[1] == "host":
        server = await asyncio.start_unix_server(registry, sys.argv[2])
    else:
        server = await asyncio.start_server(inside, "127.0.0.1", 3128)
    await server.serve_forever()

asyncio.run(main())
EOF

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
mkdir -p "$work"
if [ ! -x "$base/bin/bash" ]; then
    command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
    debootstrap --variant=minbase bookworm "$base"  # from Debian's default mirror
fi
# The hosts the proxy lets through: the chroot's Debian mirror, and PyPI's index and files as pip names them.
registries="$(awk '$1 == "deb" {split($2, url, "/"); print url[3]; exit}' "$base/etc/apt/sources.list")"
registries="$registries $(python3 -c 'from pip._internal.models.index import PyPI; print(PyPI.netloc, PyPI.file_storage_domain)')"
rm -rf "$root"
cp -a "$base" "$root"
mkdir -p "$root/root/transferd"
(cd "$here" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) \
    | tar -xf - -C "$root/root/transferd"
# This workplace's way out inspects TLS with a CA of its own, which the host trusts: so does the chroot
# (update-ca-certificates adds it once the ca-certificates package is in; PIP_CERT points pip there).
mkdir -p "$root/usr/local/share/ca-certificates"
cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true

rm -f "$sock"
# shellcheck disable=SC2086
python3 -c "$PROXY" host "$sock" $registries &
proxy=$!
until [ -S "$sock" ]; do sleep 0.1; done
trap 'kill $proxy' EXIT

if [ "$what" = demo ]; then
    # The demo runs until stopped: start it, deliver sample-001 as the README shows, then stop it.
    inner='cd /root/transferd
bash scripts/demo.sh >/root/demo.log 2>&1 &
for _ in $(seq 900); do (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null && break; sleep 1; done
tail -n 5 /root/demo.log
curl -s http://127.0.0.1:8080/submitTransfer -d product_id=sample-001 -d destination_path=file:///tmp/deliveries; echo
sleep 3
cmp transferd-data/archive/sample-001 /tmp/deliveries/sample-001 && echo "demo: sample-001 delivered, identical"'
else
    inner='cd /root/transferd && bash scripts/test.sh'
fi

unshare --pid --fork --mount-proc --net bash -c '
set -e
ip link set lo up
python3 -c "$1" inside "$2" &
until (exec 3<>/dev/tcp/127.0.0.1/3128) 2>/dev/null; do sleep 0.1; done
mount --rbind /dev "$3/dev"
mount -t proc proc "$3/proc"
chroot "$3" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    http_proxy=http://127.0.0.1:3128 https_proxy=http://127.0.0.1:3128 no_proxy=127.0.0.1,localhost,::1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    /bin/bash -c "$4"
' fresh "$PROXY" "$sock" "$root" "$inner"
