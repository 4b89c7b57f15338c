# The appliance's disk, built with systemd-repart (nixpkgs' image/repart.nix) and completed on the
# box by systemd-repart in the initrd:
#
#   built into the image (what `dd` writes)      created on first boot (never in the image)
#   ┌──────────┬──────────────────────────┐      ┌───────────────────────────────────────┐
#   │ ESP      │ comatching-store (erofs) │      │ comatching-var (ext4) → /var          │
#   │ systemd- │ the system closure,      │      │ replica, tailscale state, ssh host    │
#   │ boot +   │ read-only, mounted on    │      │ keys, journal, provisioned secrets;   │
#   │ 2 UKIs   │ /nix/store               │      │ fills the rest of the disk            │
#   └──────────┴──────────────────────────┘      └───────────────────────────────────────┘
#   / is a tmpfs: everything outside /var and /nix/store is rebuilt at every boot.
#
# Because the data partition does not exist in the image, flashing the image (dd) over the disk
# destroys it: a re-image is a full wipe. A reboot keeps it. `FactoryReset=yes` lets the second
# boot entry ("factory reset", kernel command line systemd.factory_reset=1) delete and recreate it
# without re-flashing.
{
  config,
  lib,
  pkgs,
  utils,
  modulesPath,
  ...
}:
let
  efiArch = pkgs.stdenv.hostPlatform.efiArch;

  labels = {
    esp = "esp";
    store = "comatching-store";
    data = "comatching-var";
  };
  # A GPT partition type of our own for the data partition, so systemd-repart can never match it
  # to the store partition (both would otherwise be "linux-generic"; repart assigns existing
  # partitions to definitions by type) and nothing else claims it. uuid5(URL,
  # "https://comatching.example/gpt/appliance-data").
  dataType = "80d87c71-d9b9-50eb-9c7b-d5eed49e015e";

  inherit (config.system.boot.loader) ukiFile;
  resetUkiFile = "${config.boot.uki.name}-factory-reset.efi";

  # A second UKI, identical but for `systemd.factory_reset=1` on the kernel command line, which
  # makes systemd-repart in the initrd delete and recreate every partition marked
  # FactoryReset=yes (only the data partition).
  # Its os-release names it, so the boot menu tells the two entries apart.
  ini = pkgs.formats.ini { };
  resetOsRelease = pkgs.runCommand "os-release-factory-reset" { } ''
    grep -v '^PRETTY_NAME=' ${config.system.build.etc}/etc/os-release > $out
    echo 'PRETTY_NAME="COMATCHING Edge: FACTORY RESET (wipes /var)"' >> $out
  '';
  resetUkiConfig = ini.generate "ukify-factory-reset.conf" (
    lib.recursiveUpdate config.boot.uki.settings {
      UKI = {
        Cmdline = "${config.boot.uki.settings.UKI.Cmdline} systemd.factory_reset=1";
        OSRelease = "@${resetOsRelease}";
      };
    }
  );
  resetUki = pkgs.runCommand resetUkiFile { } ''
    mkdir -p $out
    ${pkgs.buildPackages.systemdUkify}/lib/systemd/ukify build \
      --config=${resetUkiConfig} \
      --output="$out/${resetUkiFile}"
  '';

  # systemd-boot: the normal entry by default, the factory-reset entry one arrow key away for
  # three seconds; no editing of the kernel command line at the console.
  loaderConf = pkgs.writeText "loader.conf" ''
    timeout 3
    default ${ukiFile}
    editor no
    auto-entries no
    auto-firmware no
  '';

  storeDevice = "/dev/disk/by-partlabel/${labels.store}";
  dataDeviceTimeout = "15min";
in
{
  imports = [ "${modulesPath}/image/repart.nix" ];

  system.image.id = lib.mkDefault "comatching-edge";

  image.repart = {
    name = config.system.image.id;
    partitions = {
      "10-esp" = {
        contents = {
          "/EFI/BOOT/BOOT${lib.toUpper efiArch}.EFI".source =
            "${pkgs.systemd}/lib/systemd/boot/efi/systemd-boot${efiArch}.efi";
          "/EFI/Linux/${ukiFile}".source = "${config.system.build.uki}/${ukiFile}";
          "/EFI/Linux/${resetUkiFile}".source = "${resetUki}/${resetUkiFile}";
          "/loader/loader.conf".source = loaderConf;
        };
        repartConfig = {
          Type = "esp";
          Label = labels.esp;
          Format = "vfat";
          SizeMinBytes = "512M";
        };
      };
      "20-store" = {
        storePaths = [ config.system.build.toplevel ];
        # Store paths go to the partition's root; it is mounted on /nix/store. (Formerly
        # `stripNixStorePrefix = true`, which 25.11 still accepts with a warning.)
        nixStorePrefix = "/";
        repartConfig = {
          Type = "linux-generic";
          Label = labels.store;
          Format = "erofs";
          Minimize = "best";
          ReadOnly = true;
        };
      };
    };
  };

  # First boot: systemd-repart in the initrd appends the data partition in the free space behind
  # the image (after `dd` onto a larger disk it also moves the backup GPT to the disk's end).
  # Later boots: the partition exists and matches this definition, nothing changes.
  boot.initrd.systemd.repart.enable = true;
  systemd.repart.partitions."30-var" = {
    Type = dataType;
    Label = labels.data;
    Format = "ext4";
    FactoryReset = true;
    SizeMinBytes = "4G";
  };
  # mkfs.ext4 for the first boot and for a factory reset.
  boot.initrd.systemd.initrdBin = [ pkgs.e2fsprogs ];

  # systemd-repart operates on the disk behind "/" or, failing that, the one that
  # /run/systemd/volatile-root points to. "/" is a tmpfs here, so point it at the disk holding the
  # store partition before repart runs, as /dev/block/MAJ:MIN (./find-disk.sh says why that
  # form). /run survives the switch to the real root, so systemd-gpt-auto-generator and bootctl
  # there find the same disk.
  boot.initrd.systemd.services.comatching-find-disk = {
    description = "Point systemd-repart at the disk holding the store partition";
    wantedBy = [ "initrd.target" ];
    requiredBy = [ "systemd-repart.service" ];
    before = [ "systemd-repart.service" ];
    requires = [ "${utils.escapeSystemdPath storeDevice}.device" ];
    after = [ "${utils.escapeSystemdPath storeDevice}.device" ];
    unitConfig.DefaultDependencies = false;
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
    };
    script = ''
      store=${storeDevice}
      link=/run/systemd/volatile-root
      sysfs=/sys
    ''
    + builtins.readFile ./find-disk.sh;
  };

  fileSystems = {
    "/" = {
      device = "none";
      fsType = "tmpfs";
      options = [
        "mode=0755"
        "size=25%"
      ];
    };
    "/nix/store" = {
      device = storeDevice;
      fsType = "erofs";
      options = [ "ro" ];
      neededForBoot = true;
    };
    "/var" = {
      device = "/dev/disk/by-partlabel/${labels.data}";
      fsType = "ext4";
      options = [
        "noatime"
        "x-systemd.after=systemd-repart.service"
        # On the first boot (and a factory reset) this device appears only once repart has
        # created the partition, after discarding and formatting the rest of the disk, which on
        # a large or slow disk takes longer than systemd's default 90 s wait for a device; a
        # timeout here would end the boot in the initrd's reboot loop (configuration.nix).
        "x-systemd.device-timeout=${dataDeviceTimeout}"
      ];
      neededForBoot = true;
    };
    # Mounted read-write only so that provisioning can take the secrets off it (provision.nix);
    # root-only, nothing executable.
    "/boot" = {
      device = "/dev/disk/by-partlabel/${labels.esp}";
      fsType = "vfat";
      options = [
        "umask=0077"
        "nodev"
        "nosuid"
        "noexec"
        "nofail"
      ];
    };
  };

  boot.initrd.supportedFilesystems = {
    erofs = true;
    ext4 = true;
    vfat = true;
  };

  boot.loader.grub.enable = false;
  boot.initrd.systemd.enable = true;
}
