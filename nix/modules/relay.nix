# NixOS module: services.comatching-relay — the cloud relay (HTTP API, ledger, outbox, match RPC
# client) and, optionally, the RabbitMQ broker it shares with the appliances.
#
# The relay's config file is rendered from `settings` by nix/lib/toml.nix into the store, so it
# must not hold secrets: the broker password goes into `environmentFile` as
# COMATCHING_RELAY__BROKER__URL=amqp://relay:SECRET@127.0.0.1:5672/%2f (the binary reads
# COMATCHING_RELAY__SECTION__KEY overrides).
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
  cfg = config.services.comatching-relay;
  brk = cfg.broker;
  clib = import ../lib;
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    mkMerge
    types
    optional
    optionalAttrs
    literalExpression
    ;

  stateDir = "comatching-relay";

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
  # One `[section]` of the TOML file: free-form keys, plus the typed ones passed in.
  section =
    options:
    mkOption {
      type = types.submodule {
        freeformType = types.attrsOf settingValue;
        inherit options;
      };
      default = { };
    };

  configFile = pkgs.writeText "comatching-relay.toml" (clib.toml.render cfg.settings);
  exe = lib.getExe' cfg.package "comatching-relay";

  listenPort = lib.toInt (lib.last (lib.splitString ":" cfg.settings.http.listen));

  split = clib.rabbitmq.split {
    inherit (brk)
      appliances
      vhost
      deliveryLimit
      syncDeliveryLimit
      ;
  };
  topologyFile = pkgs.writeText "comatching-broker-topology.json" (builtins.toJSON split.topology);
  permissionsDir = pkgs.linkFarm "comatching-broker-permissions" (
    lib.mapAttrsToList (user: perms: {
      name = "${user}.json";
      path = pkgs.writeText "${user}.json" (builtins.toJSON perms);
    }) split.permissions
  );
  brokerUsers = clib.rabbitmq.userNames { inherit (brk) appliances; };

  # `comatching-relay admin …` for operators on the host, run as the service's own dynamic user
  # (same User= name, hence the same UID) so nothing in the state directory changes owner.
  adminCli = pkgs.writeShellScriptBin "comatching-relay-admin" ''
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
        ++ optional (cfg.environmentFile != null) "--property=EnvironmentFile=${cfg.environmentFile}"
        ++ [ exe "admin" ]
      )
    } "$@" --config ${configFile}
  '';
in
{
  options.services.comatching-relay = {
    enable = mkEnableOption "the COMATCHING Edge cloud relay";

    package = mkOption {
      type = types.package;
      description = "The package providing `bin/comatching-relay` (the flake's `cloud-relay`).";
      defaultText = literalExpression "self.packages.\${system}.cloud-relay";
    };

    settings = mkOption {
      description = ''
        The relay's configuration, rendered to TOML (sections [http], [storage], [broker],
        [matching], [ledger], [points], [rate_limit], [auth]; see cloud-relay/src/config.rs). Keys left
        unset take the binary's defaults. No secrets: this ends up in the Nix store.
      '';
      default = { };
      type = types.submodule {
        freeformType = types.attrsOf (types.attrsOf settingValue);
        options = {
          http = section {
            listen = mkOption {
              type = types.str;
              default = "127.0.0.1:8080";
              description = "Address of the HTTP API (plain HTTP: put a TLS proxy in front).";
            };
          };
          storage = section {
            data_dir = mkOption {
              type = types.str;
              default = "/var/lib/${stateDir}";
              readOnly = true;
              description = "The SQLite database lives here (the unit's StateDirectory).";
            };
          };
          broker = section {
            url = mkOption {
              type = types.str;
              default = "amqp://relay@127.0.0.1:${toString brk.port}/%2f";
              defaultText = literalExpression ''"amqp://relay@127.0.0.1:''${toString broker.port}/%2f"'';
              description = ''
                AMQP URL without the password (set the full URL in `environmentFile` as
                COMATCHING_RELAY__BROKER__URL).
              '';
            };
          };
        };
      };
    };

    environmentFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/comatching-relay.env";
      description = ''
        A file outside the Nix store with `KEY=value` lines for systemd's EnvironmentFile=, e.g.
        `COMATCHING_RELAY__BROKER__URL=amqp://relay:SECRET@127.0.0.1:5672/%2f`.
      '';
    };

    logFilter = mkOption {
      type = types.str;
      default = "info";
      description = "RUST_LOG filter.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the HTTP port (from settings.http.listen) on all interfaces.";
    };

    broker = {
      enable = mkEnableOption "a local RabbitMQ broker with the COMATCHING topology, users and permissions";

      appliances = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "edge-1" ];
        description = ''
          Appliance ids (each gets the quorum queue `comatching.sync.<id>` and the broker user
          `appliance-<id>`); 1–64 of a-z, 0-9, '-'.
        '';
      };

      vhost = mkOption {
        type = types.str;
        default = "/";
        description = "RabbitMQ virtual host of the topology.";
      };

      port = mkOption {
        type = types.port;
        default = 5672;
        description = "AMQP port (on loopback, and on the tailnet address when set).";
      };

      tailnetAddress = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "100.90.1.2";
        description = ''
          This host's tailscale IPv4 address (`tailscale ip -4`, stable per node). When set,
          RabbitMQ also listens there and the port is opened on `interface` only; otherwise it
          listens on loopback alone.
        '';
      };

      interface = mkOption {
        type = types.str;
        default = "tailscale0";
        description = "The tailnet interface the AMQP port is opened on.";
      };

      deliveryLimit = mkOption {
        type = types.ints.positive;
        default = 5;
        description = "x-delivery-limit of comatching.match and comatching.control (must equal the binaries').";
      };

      syncDeliveryLimit = mkOption {
        type = types.ints.positive;
        default = 5;
        description = "x-delivery-limit of the per-appliance sync queues (the appliances' [sync] delivery_limit).";
      };

      passwordFiles = mkOption {
        type = types.attrsOf types.str;
        default = { };
        example = literalExpression ''
          {
            relay = "/run/secrets/rabbitmq-relay";
            "appliance-edge-1" = "/run/secrets/rabbitmq-appliance-edge-1";
          }
        '';
        description = ''
          Broker user name → file (outside the store) holding its password. Loaded as systemd
          credentials; the passwords are hashed at runtime and never reach the store or a
          command line. A user without a file cannot log in.
        '';
      };
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      # The binary refuses unknown sections; a section added to the Rust config but not yet to
      # nix/lib/settings.nix only warns here, so the module never blocks a valid new section.
      warnings = map (
        sec: "services.comatching-relay.settings.${sec}: not a section the relay is known to accept (nix/lib/settings.nix); it refuses unknown fields."
      ) (clib.settings.unknownSections clib.settings.relaySections cfg.settings);

      assertions = [
        {
          assertion = builtins.match "[a-z0-9+]+://[^/@:]*:[^/@]*@.*" cfg.settings.broker.url == null;
          message = "services.comatching-relay.settings.broker.url must not contain a password (it would land in the Nix store); set COMATCHING_RELAY__BROKER__URL in environmentFile.";
        }
      ];

      systemd.services.comatching-relay = {
        description = "COMATCHING Edge cloud relay";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        restartTriggers = [ configFile ];
        environment.RUST_LOG = cfg.logFilter;
        unitConfig = clib.systemd.unitConfig;
        serviceConfig =
          clib.systemd.serviceConfig
          // {
            Type = "exec";
            StateDirectory = stateDir;
            WorkingDirectory = "%S/${stateDir}";
            # Creates or upgrades the database; idempotent.
            ExecStartPre = "${exe} migrate --config ${configFile}";
            ExecStart = "${exe} serve --config ${configFile}";
            EnvironmentFile = optional (cfg.environmentFile != null) cfg.environmentFile;
          }
          // optionalAttrs (listenPort < 1024) {
            AmbientCapabilities = [ "CAP_NET_BIND_SERVICE" ];
            CapabilityBoundingSet = [ "CAP_NET_BIND_SERVICE" ];
            # Capabilities inside a private user namespace do not cover the host's ports.
            PrivateUsers = false;
          };
      };

      networking.firewall.allowedTCPPorts = optional cfg.openFirewall listenPort;

      # For operators: the rendered config and the admin wrapper.
      environment.etc."comatching/relay.toml".source = configFile;
      environment.systemPackages = [ adminCli ];
    }

    (mkIf brk.enable {
      assertions = [
        {
          assertion = lib.all (u: builtins.elem u brokerUsers) (builtins.attrNames brk.passwordFiles);
          message = "services.comatching-relay.broker.passwordFiles names users that do not exist; known: ${toString brokerUsers}.";
        }
      ];

      services.rabbitmq = {
        enable = true;
        listenAddress = "127.0.0.1";
        inherit (brk) port;
        configItems = {
          "loopback_users.guest" = "true";
          # The topology is imported at every boot; a node with definitions to load does not
          # seed the default `guest` user (RabbitMQ 3.10.8, checked here).
          "definitions.import_backend" = "local_filesystem";
          "definitions.local.path" = "${topologyFile}";
          "definitions.skip_if_unchanged" = "true";
        }
        // optionalAttrs (brk.tailnetAddress != null) {
          "listeners.tcp.2" = "${brk.tailnetAddress}:${toString brk.port}";
        };
      };

      # Erlang distribution (25672) and epmd (4369) are not bound to loopback: the node is
      # rabbit@<hostName>, which NixOS resolves to 127.0.0.2, and rabbitmqctl must reach it.
      # The firewall opens neither port; only AMQP faces the tailnet.

      # Lets RabbitMQ bind the tailnet address before tailscaled has brought it up.
      boot.kernel.sysctl = mkIf (brk.tailnetAddress != null) {
        "net.ipv4.ip_nonlocal_bind" = 1;
      };

      networking.firewall.interfaces = mkIf (brk.tailnetAddress != null) {
        ${brk.interface}.allowedTCPPorts = [ brk.port ];
      };

      systemd.services.comatching-broker-users = {
        description = "COMATCHING broker users and permissions (passwords from credentials)";
        wantedBy = [ "multi-user.target" ];
        requires = [ "rabbitmq.service" ];
        after = [ "rabbitmq.service" ];
        # Re-run whenever the broker is restarted.
        partOf = [ "rabbitmq.service" ];
        restartTriggers = [ permissionsDir ];
        path = [
          config.services.rabbitmq.package
          pkgs.coreutils
        ];
        # rabbitmqctl finds the Erlang cookie in $HOME.
        environment.HOME = config.services.rabbitmq.dataDir;
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          User = "rabbitmq";
          Group = "rabbitmq";
          LoadCredential = lib.mapAttrsToList (user: file: "${user}:${file}") brk.passwordFiles;
          ExecStart = "${pkgs.bash}/bin/bash ${./broker-users.sh} ${permissionsDir}";
          PrivateTmp = true;
          NoNewPrivileges = true;
          ProtectSystem = "strict";
          ProtectHome = true;
          ReadWritePaths = [ config.services.rabbitmq.dataDir ];
        };
      };

      systemd.services.comatching-relay = {
        wants = [ "comatching-broker-users.service" ];
        after = [
          "rabbitmq.service"
          "comatching-broker-users.service"
        ];
      };
    })

    (mkIf (brk.enable && brk.tailnetAddress != null && config.services.tailscale.enable) {
      systemd.services.rabbitmq = {
        wants = [ "tailscaled.service" ];
        after = [ "tailscaled.service" ];
      };
    })
  ]);
}
