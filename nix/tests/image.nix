# Evaluation tests for the appliance image (image/*.nix with the appliance module), through the
# module evaluator of nix/tests/stubs/: the NixOS 25.11 option names, the watchdog in the initrd,
# the volatile-root link, the data partition's device timeout, provisioning, the reboot instead
# of an emergency shell, and the tty1 status view. The image's shell scripts themselves run in
# image/tests/scripts.sh.
let
  image = import ./stubs/image.nix;
  shipped = image { };
  c = shipped.config;
  hasPath =
    path: set:
    path == [ ]
    || (builtins.isAttrs set && set ? ${builtins.head path} && hasPath (builtins.tail path) set.${builtins.head path});
  contains = needle: s: builtins.match ".*${needle}.*" s != null;

  # Options NixOS 25.11 removed (an evaluation error) or renamed (a warning now, an error later).
  gone = [
    [ "boot" "initrd" "systemd" "extraConfig" ] # mkRemovedOptionModule: use …settings.Manager
    [ "systemd" "extraConfig" ] # mkRemovedOptionModule: use systemd.settings.Manager
    [ "systemd" "watchdog" ] # renamed to systemd.settings.Manager.*WatchdogSec
    [ "image" "repart" "partitions" "20-store" "stripNixStorePrefix" ] # superseded by nixStorePrefix
  ];
  findDisk = c.boot.initrd.systemd.services.comatching-find-disk;
  provision = c.systemd.services.comatching-provision;
  varOptions = c.fileSystems."/var".options;
  timeoutOf =
    opts:
    let
      m = builtins.filter (o: builtins.match "x-systemd.device-timeout=.*" o != null) opts;
    in
    if m == [ ] then null else builtins.head (builtins.match "x-systemd.device-timeout=(.*)" (builtins.head m));
  minutes =
    t:
    let
      m = builtins.match "([0-9]+)min" t;
    in
    if m == null then 0 else builtins.fromJSON (builtins.head m);
in
import ./harness.nix [
  {
    name = "evaluates-without-assertion-failures";
    actual = shipped.failedAssertions;
    expected = [ ];
  }
  {
    name = "finding1:no-option-removed-or-renamed-in-25.11";
    actual = builtins.filter (p: hasPath p c) gone;
    expected = [ ];
  }
  {
    name = "finding1:watchdog-in-systemd-settings";
    actual = {
      inherit (c.systemd.settings.Manager) RuntimeWatchdogSec RebootWatchdogSec;
      initrd = c.boot.initrd.systemd.settings.Manager.RuntimeWatchdogSec;
    };
    expected = {
      RuntimeWatchdogSec = "30s";
      RebootWatchdogSec = "5min";
      initrd = "60s";
    };
  }
  {
    # Without a driver in the initrd there is no /dev/watchdog0 there: the setting does nothing.
    name = "finding1:watchdog-drivers-in-the-initrd";
    actual = builtins.filter (m: !(builtins.elem m c.boot.initrd.kernelModules)) [
      "iTCO_wdt"
      "sp5100_tco"
    ];
    expected = [ ];
  }
  {
    name = "finding1:watchdog-drivers-follow-the-site";
    actual = (image { comatching.site.watchdogModules = [ "wdat_wdt" ]; }).config.boot.initrd.kernelModules;
    expected = [ "wdat_wdt" ];
  }
  {
    name = "finding2:volatile-root-script-is-find-disk";
    actual = {
      sourcesScript = contains "/dev/block/\\$devno" findDisk.script;
      variables = builtins.filter (v: !(contains v findDisk.script)) [
        "store=/dev/disk/by-partlabel/comatching-store"
        "link=/run/systemd/volatile-root"
        "sysfs=/sys"
      ];
      before = findDisk.before;
      requiredBy = findDisk.requiredBy;
    };
    expected = {
      sourcesScript = true;
      variables = [ ];
      before = [ "systemd-repart.service" ];
      requiredBy = [ "systemd-repart.service" ];
    };
  }
  {
    name = "finding2:no-dev-name-link";
    actual = contains "ln -sfn \"/dev/\\$disk\"" findDisk.script;
    expected = false;
  }
  {
    # Well above systemd's 90 s default, and the mount still waits for repart.
    name = "finding3:data-partition-device-timeout";
    actual = {
      generous = minutes (timeoutOf varOptions) >= 10;
      afterRepart = builtins.elem "x-systemd.after=systemd-repart.service" varOptions;
    };
    expected = {
      generous = true;
      afterRepart = true;
    };
  }
  {
    name = "finding5:provisioning-overwrites-and-knows-its-files";
    actual = {
      shred = contains "shred --iterations=1 --zero" provision.script;
      noPlainRm = contains "rm -f \"\\$src\"" provision.script;
      files = contains "files='tailscale-authkey appliance.env broker-ca.pem broker-client.pem broker-client.key link.key'" provision.script;
      fstrim = builtins.map (p: p.name) provision.path;
    };
    expected = {
      shred = true;
      noPlainRm = false;
      files = true;
      fstrim = [ "util-linux" ];
    };
  }
  {
    name = "finding7:no-emergency-shell-and-initrd-reboots";
    actual = {
      stage2 = c.systemd.enableEmergencyMode;
      initrdShell = c.boot.initrd.systemd.emergencyAccess;
      reboot = c.boot.initrd.systemd.services.comatching-reboot-on-failure.wantedBy;
      panic = builtins.elem "panic=10" c.boot.kernelParams;
    };
    expected = {
      stage2 = false;
      initrdShell = false;
      reboot = [ "emergency.target" ];
      panic = true;
    };
  }
  {
    # issue 11 §2: the verdict on the box's monitor, in place of tty1's getty, always restarted.
    name = "tty1:status-watch-replaces-the-getty";
    actual =
      let
        u = c.systemd.services.comatching-status-tty1;
        words = builtins.filter (w: builtins.isString w && w != "") (builtins.split " " u.serviceConfig.ExecStart);
      in
      {
        command = builtins.tail words;
        exe = builtins.head words;
        inherit (u.serviceConfig)
          TTYPath
          StandardInput
          StandardOutput
          Restart
          User
          PrivateDevices
          ;
        restartForever = u.unitConfig.StartLimitIntervalSec;
        gettyOff = c.systemd.services."getty@tty1".enable;
        autovtOff = c.systemd.services."autovt@tty1".enable;
        inherit (u) wantedBy conflicts;
        sameConfigAsService = builtins.elem (builtins.elemAt words 4) (
          builtins.split " " c.systemd.services.comatching-appliance.serviceConfig.ExecStart
        );
        noCredentials = u.serviceConfig ? LoadCredential;
      };
    expected = {
      command = [
        "status"
        "--watch"
        "--config"
        "/nix/store/00000000000000000000000000000000-comatching-appliance.toml"
      ];
      exe = "/nix/store/00000000000000000000000000000000-comatching-appliance/bin/comatching-appliance";
      TTYPath = "/dev/tty1";
      StandardInput = "tty";
      StandardOutput = "tty";
      Restart = "always";
      User = "comatching-appliance";
      PrivateDevices = false;
      restartForever = 0;
      gettyOff = false;
      autovtOff = false;
      wantedBy = [ "multi-user.target" ];
      conflicts = [
        "getty@tty1.service"
        "autovt@tty1.service"
      ];
      sameConfigAsService = true;
      noCredentials = false;
    };
  }
  {
    name = "tty1:off-without-the-option";
    actual =
      let
        off = image (
          { lib, ... }:
          {
            services.comatching-appliance.statusConsole.enable = lib.mkForce false;
          }
        );
      in
      {
        unit = off.defined (off.config.systemd.services.comatching-status-tty1 or null);
        getty = off.defined (off.config.systemd.services."getty@tty1" or null);
        rest = off.defined off.config.systemd.services.comatching-appliance.serviceConfig;
      };
    expected = {
      unit = false;
      getty = false;
      rest = true;
    };
  }
  {
    # A clustered broker: the appliance gets every member's URL, rendered as a TOML array.
    name = "broker-url-list";
    actual =
      let
        r = image {
          comatching.site.brokerUrl = [
            "amqps://appliance-edge-1@comatching-relay:5671/%2f"
            "amqps://appliance-edge-1@comatching-broker-2:5671/%2f"
          ];
        };
      in
      {
        url = (builtins.fromTOML r.config.environment.etc."comatching/appliance.toml".source.text).broker.url;
        asserts = r.failedAssertions;
      };
    expected = {
      url = [
        "amqps://appliance-edge-1@comatching-relay:5671/%2f"
        "amqps://appliance-edge-1@comatching-broker-2:5671/%2f"
      ];
      asserts = [ ];
    };
  }
  {
    name = "store-partition-prefix";
    actual = c.image.repart.partitions."20-store".nixStorePrefix;
    expected = "/";
  }
  {
    name = "state-version-follows-the-branch";
    actual = c.system.stateVersion;
    expected = "25.11";
  }
]
