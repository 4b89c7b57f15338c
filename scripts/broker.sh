#!/usr/bin/env bash
# Starts the shared RabbitMQ node that the relay, the appliance and the tests talk to, and prints
# its AMQP URL on stdout (everything else goes to stderr).
#
# Idempotent: installs rabbitmq-server from Debian packages when it is missing, writes the
# loopback-only node configuration (before the first start: the node name names the data
# directory), starts the node when it is not running, and waits until it answers. Safe to run
# from several shells at once (a lock serialises the start). Needs root on a fresh machine;
# there is no systemd here, so the node is started with `rabbitmq-server -detached`.
set -euo pipefail

NODENAME=rabbit@localhost
PIDFILE=/var/lib/rabbitmq/mnesia/${NODENAME}.pid
AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2f'
LOCK=/run/lock/comatching-broker-start.lock

log() { echo "broker.sh: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (it installs packages and writes /etc/rabbitmq)"
    exit 1
fi

mkdir -p "$(dirname "$LOCK")"
exec 9>"$LOCK"
flock -w 300 9 || { log "timed out waiting for $LOCK"; exit 1; }

if ! command -v rabbitmq-server >/dev/null 2>&1 || ! command -v rabbitmqctl >/dev/null 2>&1; then
    log "installing rabbitmq-server from Debian packages"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server >&2
fi

# Writes $1 with the content on stdin unless it already has exactly that content.
write_if_changed() {
    local path=$1 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [ -f "$path" ] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
    else
        install -m 0644 "$tmp" "$path"
        rm -f "$tmp"
        log "wrote $path"
    fi
}

mkdir -p /etc/rabbitmq
write_if_changed /etc/rabbitmq/rabbitmq-env.conf <<'CONF'
# Written by scripts/broker.sh: a single loopback-only node named rabbit@localhost.
NODENAME=rabbit@localhost
NODE_IP_ADDRESS=127.0.0.1
export ERL_EPMD_ADDRESS=127.0.0.1
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
CONF
# The small-box limits are the same items as nix/lib/rabbitmq.nix's smallBoxConfigItems (the
# relay's 1 GiB box; nix/tests/rabbitmq.nix checks they agree). A running node reads them at its
# next start only.
write_if_changed /etc/rabbitmq/rabbitmq.conf <<'CONF'
# Written by scripts/broker.sh.
listeners.tcp.default = 127.0.0.1:5672
loopback_users.guest = true
raft.wal_max_size_bytes = 67108864
vm_memory_high_watermark.absolute = 314572800
CONF

if rabbitmqctl -q -n "$NODENAME" status >/dev/null 2>&1; then
    log "node $NODENAME is already running"
else
    log "starting node $NODENAME"
    # 9>&- : the node must not inherit the lock, or it would hold it for its whole life.
    rabbitmq-server -detached >&2 9>&-
fi

if ! rabbitmqctl -q -n "$NODENAME" wait --timeout 60 "$PIDFILE" >&2; then
    log "node $NODENAME did not become ready within 60 s; see /var/log/rabbitmq/"
    exit 1
fi
log "node $NODENAME is ready"

echo "$AMQP_URL"
