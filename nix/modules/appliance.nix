# NixOS module: services.comatching-appliance — the university box's replica, matcher and status
# page. The unit is Type=notify with a watchdog: the binary sends READY=1 once it serves and
# WATCHDOG=1 while it is healthy; systemd restarts it when the pings stop.
#
# The config file is rendered from `settings` by nix/lib/toml.nix into the store, so it must not
# hold secrets: put COMATCHING_APPLIANCE__BROKER__URL=amqps://appliance-<id>:SECRET@relay:5671/%2f
# in `environmentFile`.
#
# AMQP over TLS (DESIGN.md §7): `brokerClient.{caFile,certFile,keyFile}` name files outside the
# store (on the image: provisioned from the ESP, image/provision.nix). They reach the dynamic
# user as systemd credentials (LoadCredential=) and the TOML names them by their absolute paths
# /run/credentials/comatching-appliance.service/<id>, since a static file in the store cannot
# say $CREDENTIALS_DIRECTORY (nix/lib/tls.nix). The binary reads them once at start and refuses
# to start without them; a missing source file fails the unit at the credentials step
# (status=243/CREDENTIALS), and Restart=always retries until it is there.
#
# The link key (`linkKeyFile` → [broker] link_key_file; on the image `link.key` from the ESP)
# takes the same road and fails the same way when its file is missing. It must be the relay's
# file: with it the appliance tags what it publishes and refuses untagged or wrongly tagged
# sync events and match requests (dead-lettered, `sync.unauthenticated` on /status).
#
# Option names of nixpkgs used below were checked against nixpkgs' own module sources; see
# docs/operations.md, "Sources checked".
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.comatching-appliance;
  ts = config.services.tailscale;
  clib = import ../lib;
  unit = "comatching-appliance";
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    types
    optional
    optionals
    literalExpression
    ;

  stateDir = "comatching-appliance";
  autoconnect = ts.enable && ts.authKeyFile != null;

  scalar =
    with types;
    oneOf [
      bool
      int
      float
      str
      path
    ];
  settingValue = with types; nullOr (either scalar (listOf scalar));
  section =
    options:
    mkOption {
      type = types.submodule {
        freeformType = types.attrsOf settingValue;
        inherit options;
      };
      default = { };
    };

  configFile = pkgs.writeText "comatching-appliance.toml" (clib.toml.render cfg.settings);
  exe = lib.getExe' cfg.package "comatching-appliance";
  httpPort = lib.toInt (lib.last (lib.splitString ":" cfg.settings.http.listen));

  clientCreds = clib.tls.brokerClient {
    inherit unit;
    what = "services.comatching-appliance.brokerClient";
    inherit (cfg.brokerClient) caFile certFile keyFile;
  };
  brokerTls = cfg.brokerClient.caFile != null;
  linkCreds = clib.tls.linkKey {
    inherit unit;
    what = "services.comatching-appliance";
    file = cfg.linkKeyFile;
  };
  # Everything the unit loads; the CLI wrapper's transient unit loads the same.
  loadCredential = clientCreds.loadCredential ++ linkCreds.loadCredential;

  # The CLI runs in a transient unit with a name of its own, so it gets the same credentials
  # under /run/credentials/run-….service/; this points the [broker] tls_* keys (for `doctor`'s
  # broker check) and link_key_file there, through COMATCHING_APPLIANCE__BROKER__* overrides.
  # No subcommand reads the link key today (appliance/src/cli_ops.rs), but the TOML's path is
  # the service's, which the transient unit cannot read: a subcommand that starts reading it
  # would fail on that path, so the wrapper points it at its own copy like the certificates.
  cliExports = clib.tls.cliExports clib.settings.applianceEnvPrefix "broker";
  cliCredentials = pkgs.writeShellScript "comatching-appliance-cli-credentials" ''
    ${cliExports clientCreds}${cliExports linkCreds}exec "$@"
  '';

  # `comatching-appliance status|resync|doctor …` for maintainers over ssh, run as the service's
  # own dynamic user (same User= name, hence the same UID) on its state directory.
  cli = pkgs.writeShellScriptBin "comatching-appliance-cli" ''
    exec ${
      lib.escapeShellArgs (
        [
          "${config.systemd.package}/bin/systemd-run"
          "--quiet"
          "--pipe"
          "--wait"
          "--collect"
          "--property=DynamicUser=yes"
          "--property=User=${stateDir}"
          "--property=StateDirectory=${stateDir}"
        ]
        ++ optional (cfg.environmentFile != null) "--property=EnvironmentFile=-${cfg.environmentFile}"
        ++ map (c: "--property=LoadCredential=${c}") loadCredential
        ++ optional (loadCredential != [ ]) "${cliCredentials}"
        ++ [ exe ]
      )
    } "$@" --config ${configFile}
  '';
in
{
  options.services.comatching-appliance = {
    enable = mkEnableOption "the COMATCHING Edge appliance";

    package = mkOption {
      type = types.package;
      description = "The package providing `bin/comatching-appliance` (the flake's `appliance`).";
      defaultText = literalExpression "self.packages.\${system}.appliance";
    };

    settings = mkOption {
      description = ''
        The appliance's configuration, rendered to TOML (sections [appliance], [http],
        [storage], [broker], [sync], [matching], [tailscale]; see appliance/src/node/config.rs).
        Keys left unset take the binary's defaults. No secrets: this ends up in the Nix store.
      '';
      default = { };
      type = types.submodule {
        freeformType = types.attrsOf (types.attrsOf settingValue);
        options = {
          appliance = section {
            id = mkOption {
              type = types.strMatching "[a-z0-9][a-z0-9-]{0,63}";
              example = "edge-1";
              description = "Appliance id: names its sync queue `comatching.sync.<id>` and broker user `appliance-<id>`.";
            };
          };
          http = section {
            listen = mkOption {
              type = types.str;
              default = "127.0.0.1:8081";
              description = "Status page, health and metrics. Keep it on loopback or behind the tailnet-only firewall.";
            };
          };
          storage = section {
            data_dir = mkOption {
              type = types.str;
              default = "/var/lib/${stateDir}";
              readOnly = true;
              description = "The replica lives here (the unit's StateDirectory; on the data partition in the image).";
            };
            backend = mkOption {
              type = types.enum [
                "sqlite"
                "sled"
              ];
              default = "sqlite";
              description = "Replica store backend.";
            };
          };
          broker = section {
            url = mkOption {
              type = types.either types.str (types.listOf types.str);
              default = clib.tls.amqpUrl {
                user = "appliance-${cfg.settings.appliance.id}";
                host = "127.0.0.1";
                tls = brokerTls;
              };
              defaultText = literalExpression ''
                "amqps://appliance-''${settings.appliance.id}@127.0.0.1:5671/%2f" with brokerClient.caFile set,
                "amqp://appliance-''${settings.appliance.id}@127.0.0.1:5672/%2f" otherwise'';
              description = ''
                AMQP URL without the password, or a list of them (the members of a clustered
                broker, tried in turn). Set the full URL(s) in `environmentFile` as
                COMATCHING_APPLIANCE__BROKER__URL (comma-separated for a list), with the same
                scheme: amqps:// when the brokerClient files are set.
              '';
            };
            tls_ca = mkOption {
              type = types.nullOr types.str;
              default = clientCreds.settings.tls_ca;
              defaultText = literalExpression ''"/run/credentials/comatching-appliance.service/broker-ca.pem" if brokerClient.caFile is set, else null'';
              description = "The only CA the broker's certificate may chain to (the credential from `brokerClient.caFile`).";
            };
            tls_cert = mkOption {
              type = types.nullOr types.str;
              default = clientCreds.settings.tls_cert;
              defaultText = literalExpression ''"/run/credentials/comatching-appliance.service/broker-cert.pem" if brokerClient.certFile is set, else null'';
              description = "Client certificate presented to the broker (the credential from `brokerClient.certFile`).";
            };
            tls_key = mkOption {
              type = types.nullOr types.str;
              default = clientCreds.settings.tls_key;
              defaultText = literalExpression ''"/run/credentials/comatching-appliance.service/broker-key.pem" if brokerClient.keyFile is set, else null'';
              description = "Key of the client certificate (the credential from `brokerClient.keyFile`).";
            };
            link_key_file = mkOption {
              type = types.nullOr types.str;
              default = linkCreds.settings.link_key_file;
              defaultText = literalExpression ''"/run/credentials/comatching-appliance.service/link.key" if linkKeyFile is set, else null'';
              description = "The link key as the appliance reads it (the credential from `linkKeyFile`).";
            };
          };
          tailscale = section {
            cli = mkOption {
              type = types.str;
              default = if ts.enable then lib.getExe' ts.package "tailscale" else "tailscale";
              defaultText = literalExpression ''if services.tailscale.enable then "''${services.tailscale.package}/bin/tailscale" else "tailscale"'';
              description = "The tailscale CLI the status probe runs (`tailscale status --json`).";
            };
            timeout_ms = mkOption {
              type = types.ints.positive;
              default = 2000;
              description = "Deadline of one tailscale probe; a wedged daemon is reported as `timeout`.";
            };
          };
        };
      };
    };

    environmentFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/var/lib/comatching-provision/appliance.env";
      description = ''
        A file outside the Nix store with `KEY=value` lines for systemd's EnvironmentFile=, e.g.
        `COMATCHING_APPLIANCE__BROKER__URL=amqps://appliance-edge-1:SECRET@relay:5671/%2f`
        (the scheme must match `brokerClient`, or the binary refuses to start).
        A missing file is tolerated (the unit starts with the settings alone).
      '';
    };

    brokerClient = {
      caFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/var/lib/comatching-provision/broker-ca.pem";
        description = ''
          Our private CA's certificate (`comatching-relay pki init` → ca.pem), the only root
          trusted for the broker's certificate. Setting it makes the default broker URL
          amqps:// on 5671. A file outside the store, loaded as a systemd credential.
        '';
      };
      certFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/var/lib/comatching-provision/broker-client.pem";
        description = ''
          This appliance's client certificate (`comatching-relay pki issue --name
          appliance-<id> --kind client`), with `keyFile`; outside the store.
        '';
      };
      keyFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/var/lib/comatching-provision/broker-client.key";
        description = "Key of `brokerClient.certFile` (outside the store).";
      };
    };

    linkKeyFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/var/lib/comatching-provision/link.key";
      description = ''
        The deployment's link key (`comatching-relay pki link-key` → link.key, 64 hex digits):
        the relay's own file, the same on every appliance. A file outside the store, loaded as
        a systemd credential. With it the appliance tags what it publishes (HMAC-SHA256, header
        `x-cm-mac`) and refuses messages without a valid tag; without it, it tags nothing, so
        a relay that has a key refuses its hellos and replies and it never becomes ready.
      '';
    };

    logFilter = mkOption {
      type = types.str;
      default = "info";
      description = "RUST_LOG filter.";
    };

    watchdogSec = mkOption {
      type = types.str;
      default = "30s";
      description = "WatchdogSec= of the unit: the binary must send WATCHDOG=1 more often than this.";
    };

    startTimeout = mkOption {
      type = types.str;
      default = "5min";
      description = "TimeoutStartSec=: how long the binary may take to send READY=1.";
    };

    statusConsole = {
      enable = mkEnableOption ''
        the status view on a console: `comatching-appliance status --watch` (the verdict and
        facts in plain text, redrawn every 2 s) on `statusConsole.tty` instead of a login
        prompt, restarted whenever it exits'';

      tty = mkOption {
        type = types.strMatching "tty[0-9]+";
        default = "tty1";
        description = "The virtual console it takes over (its getty is switched off).";
      };
    };

    tailnetInterface = mkOption {
      type = types.str;
      default = "tailscale0";
      description = "Interface on which `openFirewallOnTailnet` opens the status page port.";
    };

    openFirewallOnTailnet = mkOption {
      type = types.bool;
      default = false;
      description = "Open the status page port (from settings.http.listen) on `tailnetInterface` only.";
    };
  };

  config = mkIf cfg.enable {
    # The binary refuses unknown sections; a section added to the Rust config but not yet to
    # nix/lib/settings.nix only warns here, so the module never blocks a valid new section.
    warnings = map (
      sec: "services.comatching-appliance.settings.${sec}: not a section the appliance is known to accept (nix/lib/settings.nix); it refuses unknown fields."
    ) (clib.settings.unknownSections clib.settings.applianceSections cfg.settings);

    assertions = [
      {
        assertion = lib.all (u: builtins.match "[a-z0-9+]+://[^/@:]*:[^/@]*@.*" u == null) (
          if builtins.isList cfg.settings.broker.url then cfg.settings.broker.url else [ cfg.settings.broker.url ]
        );
        message = "services.comatching-appliance.settings.broker.url must not contain a password (it would land in the Nix store); set COMATCHING_APPLIANCE__BROKER__URL in environmentFile.";
      }
    ]
    # The rules the binary checks at start (nix/lib/tls.nix), so they fail here instead.
    ++ map (message: {
      assertion = false;
      inherit message;
    }) (
      clientCreds.errors
      ++ linkCreds.errors
      ++ map (m: "services.comatching-appliance.settings: ${m}") (clib.tls.brokerErrors cfg.settings.broker)
    );

    systemd.services.comatching-appliance = {
      description = "COMATCHING Edge appliance";
      wantedBy = [ "multi-user.target" ];
      # Ordered after the tailnet join so the first status already shows the tailnet; `wants`,
      # not `requires`: without the tailnet the box still starts and reports why.
      wants = [ "network-online.target" ] ++ optional autoconnect "tailscaled-autoconnect.service";
      after = [
        "network-online.target"
      ]
      ++ optionals ts.enable [ "tailscaled.service" ]
      ++ optional autoconnect "tailscaled-autoconnect.service";
      restartTriggers = [ configFile ];
      environment.RUST_LOG = cfg.logFilter;
      unitConfig = clib.systemd.unitConfig;
      serviceConfig = clib.systemd.serviceConfig // {
        Type = "notify";
        NotifyAccess = "main";
        WatchdogSec = cfg.watchdogSec;
        TimeoutStartSec = cfg.startTimeout;
        StateDirectory = stateDir;
        WorkingDirectory = "%S/${stateDir}";
        ExecStart = "${exe} run --config ${configFile}";
        # "-": a box that has not been provisioned yet still starts and shows its status.
        EnvironmentFile = optional (cfg.environmentFile != null) "-${cfg.environmentFile}";
        # The broker CA, client certificate and key, and the link key, readable by the
        # dynamic user.
        LoadCredential = loadCredential;
      };
    };

    # The status view on the box's own monitor (issue 11 §2). It replaces the login prompt on
    # that console: root has no password on the image, so the prompt was of no use there.
    # No credentials are loaded: `status` reads no broker certificate, and the view must come
    # up exactly when provisioning is incomplete (a missing credential would stop the unit).
    # Runs as the service's dynamic user (same User= name, same UID) like the CLI wrapper.
    systemd.services."getty@${cfg.statusConsole.tty}".enable = mkIf cfg.statusConsole.enable false;
    systemd.services."autovt@${cfg.statusConsole.tty}".enable = mkIf cfg.statusConsole.enable false;
    systemd.services."comatching-status-${cfg.statusConsole.tty}" = mkIf cfg.statusConsole.enable {
      description = "COMATCHING Edge status view on ${cfg.statusConsole.tty}";
      wantedBy = [ "multi-user.target" ];
      after = [
        "systemd-user-sessions.service"
        "comatching-appliance.service"
      ];
      conflicts = [
        "getty@${cfg.statusConsole.tty}.service"
        "autovt@${cfg.statusConsole.tty}.service"
      ];
      environment.RUST_LOG = "warn";
      unitConfig = clib.systemd.unitConfig;
      serviceConfig =
        clib.systemd.serviceConfig
        // {
          Type = "simple";
          User = stateDir;
          StateDirectory = stateDir;
          WorkingDirectory = "%S/${stateDir}";
          ExecStart = "${exe} status --watch --config ${configFile}";
          # PID 1 opens the console before it drops to the dynamic user; resetting and
          # deallocating it clears whatever the kernel or a previous run left there.
          StandardInput = "tty";
          StandardOutput = "tty";
          StandardError = "journal";
          TTYPath = "/dev/${cfg.statusConsole.tty}";
          TTYReset = true;
          TTYVHangup = true;
          TTYVTDisallocate = true;
          # The console is a device node: a private /dev would not have it.
          PrivateDevices = false;
          DeviceAllow = [ "/dev/${cfg.statusConsole.tty} rw" ];
          # Redraws every 2 s; if it ever exits, the screen comes back within the same time.
          Restart = "always";
          RestartSec = "2s";
        };
    };

    environment.etc."comatching/appliance.toml".source = configFile;
    environment.systemPackages = [ cli ];

    networking.firewall.interfaces = mkIf cfg.openFirewallOnTailnet {
      ${cfg.tailnetInterface}.allowedTCPPorts = [ httpPort ];
    };
  };
}
