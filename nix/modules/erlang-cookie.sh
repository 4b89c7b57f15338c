# Installs the cluster's Erlang cookie for RabbitMQ from a systemd credential (rabbitmq.service's
# preStart, as the `rabbitmq` user; services.comatching-relay.broker.cluster.cookieFile).
#
# Usage: erlang-cookie.sh DATA_DIR
#   Reads "$CREDENTIALS_DIRECTORY/erlang-cookie" (LoadCredential=), drops CR/LF, checks it is
#   20-255 letters and digits, and writes DATA_DIR/.erlang.cookie (mode 0400) when it differs.
#   DATA_DIR is the node's home: the node and rabbitmqctl (the broker-users unit) both read the
#   cookie there. The cookie never reaches the store or a command line.
set -euo pipefail
dir=${1:?usage: erlang-cookie.sh DATA_DIR}
src=${CREDENTIALS_DIRECTORY:?no credentials directory (LoadCredential=erlang-cookie:…)}/erlang-cookie
cookie=$(tr -d '\r\n' <"$src")
if ! [[ $cookie =~ ^[A-Za-z0-9]{20,255}$ ]]; then
  echo "erlang-cookie: the cookie must be 20-255 letters and digits (got ${#cookie} characters)" >&2
  exit 1
fi
dst=$dir/.erlang.cookie
if [ -f "$dst" ] && [ "$(cat "$dst")" = "$cookie" ]; then
  exit 0
fi
umask 077
printf '%s' "$cookie" >"$dst.new"
chmod 0400 "$dst.new"
mv -f "$dst.new" "$dst"
echo "erlang-cookie: installed the cluster cookie in $dst"
