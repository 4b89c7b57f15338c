# The appliance's NixOS configuration: `nixosConfigurations.appliance`, built into
# `packages.x86_64-linux.appliance-image` (a raw GPT disk image made by systemd-repart).
#
# What the box does with no one at the keyboard: boots the UKI, grows its data partition on the
# first boot, takes its secrets off the ESP, joins the tailnet with the provisioned auth key,
# starts the appliance (after the tailnet join), and serves the status page and ssh on the
# tailnet only. The hardware watchdog reboots a hung box; a failed boot reboots instead of
# waiting at an emergency shell. There is no nix, no nixos-rebuild, no switching: updates are a
# new image.
#
# Site-specific values (appliance id, maintainers' ssh keys) are in ./site.nix.
{
  config,
  lib,
  modulesPath,
  ...
}:
let
  site = config.comatching.site;
  provisionDir = config.comatching.provisionDir;
  clib = import ../nix/lib;
in
{
  imports = [
    "${modulesPath}/profiles/minimal.nix"
    ./disk.nix
    ./provision.nix
    ./site.nix
  ];

  options.comatching.site = {
    applianceId = lib.mkOption {
      type = lib.types.strMatching "[a-z0-9][a-z0-9-]{0,63}";
      description = "The appliance id (broker user appliance-<id>, queue comatching.sync.<id>).";
    };
    hostName = lib.mkOption {
      type = lib.types.strMatching "[a-z0-9][a-z0-9-]{0,62}";
      default = "comatching-edge";
      description = "Host name, also the tailnet (MagicDNS) name.";
    };
    sshKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = "Maintainers' ssh public keys for root (over the tailnet only).";
    };
    brokerHost = lib.mkOption {
      type = lib.types.str;
      default = "comatching-relay";
      description = ''
        The relay's broker on the tailnet: its MagicDNS name or tailnet address. With
        `brokerTls` it must be one of the names in the broker's certificate (`pki issue --name
        broker --dns … --ip …`).
      '';
    };
    brokerTls = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        AMQP over TLS to the broker (amqps:// on 5671), with a client certificate. The box then
        needs broker-ca.pem, broker-client.pem and broker-client.key provisioned next to
        appliance.env (docs/operations.md §3), and does not start the appliance without them.
      '';
    };
    # Required on the shipped image (site.nix sets it), like brokerTls, and for the same kind of
    # reason. An appliance without the key in a deployment that has one is worse than one that
    # does not start: the relay refuses its untagged hellos and replies, so it never becomes
    # ready and serves no match, its status page says "not ready" without saying why, and it
    # accepts any message anyone with broker access publishes to its queues. Not starting
    # (status=243/CREDENTIALS, retried every 2 s, as for missing certificates) names the missing
    # file, never runs unauthenticated, and heals once the file is provisioned. The option
    # defaults to false like brokerTls and like the binaries (no key: nothing tagged or
    # checked), so leaving it out of site.nix keeps the old behaviour and the requirement is set
    # where the other deployment-wide choices are. Independent of brokerTls: the tag works over
    # amqp:// and amqps:// alike.
    linkKey = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Authenticate every broker message with the deployment's link key (an HMAC tag; the
        relay's `linkKeyFile` must be the same file). The box then needs link.key provisioned
        next to appliance.env (docs/operations.md §3), and does not start the appliance without
        it.
      '';
    };
    brokerUrl = lib.mkOption {
      type = lib.types.either lib.types.str (lib.types.listOf lib.types.str);
      default = clib.tls.amqpUrl {
        user = "appliance-${site.applianceId}";
        host = site.brokerHost;
        tls = site.brokerTls;
      };
      defaultText = lib.literalExpression ''"amqps://appliance-<applianceId>@<brokerHost>:5671/%2f" (amqp:// and 5672 without brokerTls)'';
      description = ''
        The relay's broker, without the password (which comes with appliance.env at
        provisioning; the URL there must use the same scheme and port). With a clustered broker,
        a list: one URL per member, e.g. the relay's host first, then the other members.
      '';
    };
    watchdogModules = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [
        "lpc_ich"
        "i2c_i801"
        "iTCO_wdt"
        "sp5100_tco"
      ];
      example = [ "iTCO_wdt" ];
      description = ''
        Kernel modules loaded in the initrd so the hardware watchdog exists before the real root
        is mounted: Intel's TCO timer (iTCO_wdt, whose device lpc_ich or, on newer chipsets,
        i2c_i801 creates) and AMD's (sp5100_tco). A module for absent hardware loads and binds
        nothing. Narrow it to what `wdctl` reports on the real box (docs/operations.md).
      '';
    };
    tailscaleUpFlags = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "--advertise-tags=tag:comatching-edge" ];
      description = "Extra flags for `tailscale up` at the first join.";
    };
  };

  config = {
    # Every image starts with an empty /var (a re-image wipes the data partition, and nothing
    # stateful lives elsewhere), so the state is always as old as the release the image is built
    # from: stateVersion follows the nixpkgs branch in flake.nix.
    system.stateVersion = "25.11";
    networking.hostName = site.hostName;

    # ---- the appliance -------------------------------------------------------------------
    services.comatching-appliance = {
      enable = true;
      settings = {
        appliance.id = site.applianceId;
        # All interfaces, but the firewall admits the port on tailscale0 only.
        http.listen = "0.0.0.0:8081";
        broker.url = site.brokerUrl;
      };
      environmentFile = "${provisionDir}/appliance.env";
      # Provisioned from the ESP like appliance.env (./provision.nix); systemd credentials.
      brokerClient = lib.mkIf site.brokerTls {
        caFile = "${provisionDir}/broker-ca.pem";
        certFile = "${provisionDir}/broker-client.pem";
        keyFile = "${provisionDir}/broker-client.key";
      };
      # Provisioned from the ESP the same way; a systemd credential like the certificates.
      linkKeyFile = lib.mkIf site.linkKey "${provisionDir}/link.key";
      openFirewallOnTailnet = true;
      # The verdict on the box's own monitor for staff without a phone (issue 11): tty1 shows
      # `comatching-appliance status --watch` instead of a login prompt nobody can use.
      statusConsole.enable = true;
    };

    # ---- tailscale -----------------------------------------------------------------------
    services.tailscale = {
      enable = true;
      # A string, not a Nix path: the key stays on the data partition, never in the store.
      authKeyFile = "${provisionDir}/tailscale-authkey";
      extraUpFlags = [ "--hostname=${site.hostName}" ] ++ site.tailscaleUpFlags;
      # Direct connections work through NAT without an open port; nothing is opened globally.
      openFirewall = false;
    };
    systemd.services.tailscaled-autoconnect = {
      # Not provisioned yet: skip instead of running `tailscale up` with an empty key.
      unitConfig.ConditionPathExists = "${provisionDir}/tailscale-authkey";
      # The appliance is ordered after this unit; never let a stuck login hold it back forever.
      serviceConfig.TimeoutStartSec = "3min";
      after = [ "comatching-provision.service" ];
    };

    # ---- network and firewall: nothing reachable except over the tailnet ----------------------
    networking.useNetworkd = true;
    # tailscaled hands MagicDNS (the relay's name in brokerUrl) to resolved.
    services.resolved.enable = true;
    networking.firewall = {
      enable = true;
      allowedTCPPorts = lib.mkForce [ ];
      allowedUDPPorts = lib.mkForce [ ];
      interfaces.tailscale0.allowedTCPPorts = [ 22 ];
    };

    # ---- ssh: keys only, tailnet only ------------------------------------------------------
    services.openssh = {
      enable = true;
      openFirewall = false;
      settings = {
        PasswordAuthentication = false;
        KbdInteractiveAuthentication = false;
        PermitRootLogin = "prohibit-password";
      };
      # On the data partition, so the host key survives reboots (/ is a tmpfs).
      hostKeys = [
        {
          path = "/var/lib/ssh/ssh_host_ed25519_key";
          type = "ed25519";
        }
      ];
    };
    users.mutableUsers = false;
    users.users.root = {
      # No password: no console login, ssh keys only.
      hashedPassword = "!";
      openssh.authorizedKeys.keys = site.sshKeys;
    };
    # The appliance runs without anyone logging in; with no key, build anyway (and say so).
    users.allowNoPasswordLogin = true;
    warnings = lib.optional (site.sshKeys == [ ]) "comatching.site.sshKeys is empty: nobody can ssh into the appliance.";

    # ---- no nix, no switching: the image is the unit of deployment -------------------------
    nix.enable = false;
    system.switch.enable = false;

    # ---- watchdog and failure handling: reboot rather than wait for a human ---------------------
    # PID 1 pets the hardware watchdog (/dev/watchdog0); a hung kernel or PID 1 resets the box.
    # (`systemd.watchdog.*` before NixOS 25.11, now renamed into systemd.conf's own keys.)
    systemd.settings.Manager = {
      RuntimeWatchdogSec = "30s";
      RebootWatchdogSec = "5min";
    };
    # The same in the initrd, where a wait for a disk or for repart could otherwise hang forever.
    # `boot.initrd.systemd.extraConfig` is a removed option in 25.11 (an evaluation error). The
    # setting alone did nothing on 25.05 either: the initrd carries only the kernel modules it is
    # told to, and no watchdog driver was among them, so /dev/watchdog0 never appeared there.
    # PID 1 opens the device lazily on its next ping once the module has created it.
    boot.initrd.systemd.settings.Manager.RuntimeWatchdogSec = "60s";
    boot.initrd.kernelModules = site.watchdogModules;
    boot.kernelParams = [ "panic=10" ];
    boot.kernel.sysctl."kernel.panic_on_oops" = 1;
    # No emergency shell anywhere. In the initrd (where the store and /var are mounted) a failure
    # reaches emergency.target, and the unit below reboots after 30 s. After the switch to the
    # real root there is no emergency.target at all (this option leaves it out), so a failing
    # unit does not stop the boot: the rest comes up and the failed unit is retried by its own
    # Restart= policy (the appliance's is "always"); a hang is the watchdog's.
    systemd.enableEmergencyMode = false;
    boot.initrd.systemd.emergencyAccess = false;
    boot.initrd.systemd.services.comatching-reboot-on-failure = {
      description = "Reboot instead of an emergency shell";
      wantedBy = [ "emergency.target" ];
      unitConfig.DefaultDependencies = false;
      serviceConfig = {
        Type = "oneshot";
        ExecStart = [
          "/bin/sleep 30"
          "/bin/systemctl --force reboot"
        ];
      };
    };

    # ---- state on the data partition ------------------------------------------------------------
    # / is a tmpfs: keep one machine id for the box's life on /var (journal, systemd state).
    system.activationScripts.comatching-machine-id = {
      deps = [ "etc" ];
      text = ''
        if [ ! -s /var/lib/comatching-machine-id ]; then
          mkdir -p /var/lib
          tr -d '-' < /proc/sys/kernel/random/uuid > /var/lib/comatching-machine-id
        fi
        cp /var/lib/comatching-machine-id /etc/machine-id
      '';
    };
    services.journald.extraConfig = ''
      Storage=persistent
      SystemMaxUse=1G
    '';
  };
}
