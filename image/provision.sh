# Moves the provisioning secrets from the ESP to the data partition (image/provision.nix,
# comatching-provision.service). Bash, sourced after these variables are set:
#   esp_dir  where maintainers put the files (/boot/comatching, FAT)
#   dir      where they go (/var/lib/comatching-provision, ext4, root-only)
#   files    the space-separated names the image knows
# Needs coreutils (tr, sync, shred, mv) and, optionally, util-linux's fstrim.
#
# FAT overwrites a file in place and `rm` only marks its clusters free, so a removed key stays
# readable from the free clusters of the ESP. Each file is therefore overwritten (random, then
# zeros, each pass synced) before it is unlinked, and the freed clusters are then discarded.
# What this cannot reach is said in docs/operations.md ("What a stolen box gives away").
set -eu
umask 077
mkdir -p "$dir"
chmod 0700 "$dir"

erase() {
  # In place, without truncating (FAT would free the clusters with the bytes still in them):
  # one random pass, then zeros, each synced, rounded up to whole blocks so the slack of the
  # last cluster is covered too; only then unlink.
  shred --iterations=1 --zero "$1"
  rm -f "$1"
}

for f in $files; do
  src=$esp_dir/$f
  [ -f "$src" ] || continue
  # Windows editors like CRLF; none of these files wants it (PEM parsers take LF; the link key
  # is hex; the env file's values would keep the CR).
  tr -d '\r' < "$src" > "$dir/.$f.new"
  sync "$dir/.$f.new"
  mv "$dir/.$f.new" "$dir/$f"
  erase "$src"
  echo "provisioned $f"
done

# Anything else in the directory is most likely a secret under a wrong name (tailscale-authkey.txt
# from a text editor, a key file copied as is). It is not used, and it must not stay on the FAT
# partition either: erase it the same way and say so.
for src in "$esp_dir"/* "$esp_dir"/.[!.]*; do
  [ -e "$src" ] || continue
  if [ -f "$src" ]; then
    echo "not a file this image uses, erased: ${src##*/} (expected one of: $files)" >&2
    erase "$src"
  else
    echo "left alone, not a regular file: ${src##*/}" >&2
  fi
done
sync "$esp_dir" || true
# Discarding the freed clusters asks the SSD to forget them too (vfat supports FITRIM); a disk
# or controller without discard support refuses, which changes nothing above.
if command -v fstrim >/dev/null 2>&1; then
  fstrim "${esp_mount:-/boot}" 2>/dev/null || echo "fstrim ${esp_mount:-/boot}: not supported here (the files were overwritten anyway)" >&2
fi
