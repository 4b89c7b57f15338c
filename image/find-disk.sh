# Points /run/systemd/volatile-root at the disk holding the store partition, in the initrd before
# systemd-repart runs (image/disk.nix, comatching-find-disk.service). Bash, sourced after three
# variables are set:
#   store  the store partition's device path (/dev/disk/by-partlabel/comatching-store)
#   link   the link to write (/run/systemd/volatile-root)
#   sysfs  where sysfs is mounted (/sys; a fake tree in scripts/nix-check.sh)
#
# The link must read /dev/block/MAJOR:MINOR: systemd reads it back with
# device_path_parse_major_minor (blockdev_get_root, src/shared/blockdev-util.c), on which
# systemd-gpt-auto-generator and `bootctl --print-root-device` rely, and refuses any other form
# such as /dev/nvme0n1. systemd-repart opens the path, which works for both forms; udev creates
# a /dev/block/ link for every block device. Needs coreutils (in the initrd's /bin).
set -eu
part=$(readlink -f "$store")
pdir=$sysfs/class/block/${part##*/}
if [ ! -e "$pdir/partition" ]; then
  echo "comatching-find-disk: $store ($part) is not a partition" >&2
  exit 1
fi
# A partition's sysfs directory sits inside its disk's.
disk=$(readlink -f "$pdir/..")
devno=$(cat "$disk/dev")
if ! [[ $devno =~ ^[0-9]+:[0-9]+$ ]]; then
  echo "comatching-find-disk: unexpected device number '$devno' in $disk/dev" >&2
  exit 1
fi
mkdir -p "${link%/*}"
ln -sfn "/dev/block/$devno" "$link"
echo "comatching-find-disk: systemd-repart will operate on ${disk##*/} (/dev/block/$devno), store partition $part"
