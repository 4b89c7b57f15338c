# One scheduled backup of the relay's database (comatching-relay-backup.service, from
# services.comatching-relay.backup), then the optional off-box command.
#
# Usage: relay-backup.sh RELAY_EXE CONFIG DIRECTORY KEEP [POST_COMMAND]
#   Runs `RELAY_EXE backup --config CONFIG --to DIRECTORY --keep KEEP`, which prints exactly one
#   JSON line on stdout whose `path` is the new file (cloud-relay's `backup` command). The line
#   goes to the journal as it is. With POST_COMMAND (an executable), runs it with the new file as
#   its only argument and in $COMATCHING_BACKUP_FILE; its failure fails the unit (the backup
#   itself stays). Needs bash, coreutils and jq on PATH.
set -euo pipefail
exe=${1:?usage: relay-backup.sh RELAY_EXE CONFIG DIRECTORY KEEP [POST_COMMAND]}
config=${2:?config}
dir=${3:?directory}
keep=${4:?keep}
post=${5:-}

out=$("$exe" backup --config "$config" --to "$dir" --keep "$keep")
printf '%s\n' "$out"
if [ "$(printf '%s\n' "$out" | grep -c .)" -ne 1 ]; then
  echo "relay-backup: expected one JSON line from \`comatching-relay backup\`, got the above" >&2
  exit 1
fi
if ! path=$(printf '%s\n' "$out" | jq -er '.path | strings'); then
  echo "relay-backup: the backup's JSON line has no \"path\" string" >&2
  exit 1
fi
case $path in
  "$dir"/*) ;;
  *)
    echo "relay-backup: the new file $path is not in $dir" >&2
    exit 1
    ;;
esac
if [ ! -f "$path" ]; then
  echo "relay-backup: the new file $path does not exist" >&2
  exit 1
fi
if [ -n "$post" ]; then
  echo "relay-backup: off-box command for $path"
  COMATCHING_BACKUP_FILE=$path "$post" "$path"
fi
