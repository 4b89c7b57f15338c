# NixOS module: services.comatching-relay — the cloud relay (HTTP API, ledger, outbox, match RPC
# client) and, optionally, the RabbitMQ broker it shares with the appliances.
#
# The relay's config file is rendered from `settings` by nix/lib/toml.nix into the store, so it
# must not hold secrets: the broker password goes into `environmentFile` as
# COMATCHING_RELAY__BROKER__URL=amqps://relay:SECRET@127.0.0.1:5671/%2f (the binary reads
# COMATCHING_RELAY__SECTION__KEY overrides).
#
# TLS (DESIGN.md §7): certificates and keys stay in files outside the store and reach the
# services as systemd credentials (LoadCredential=, read by PID 1 as root, so root-only files
# work with the relay's DynamicUser and with the `rabbitmq` user):
#   https.{certFile,keyFile}               → the relay's HTTPS listener, [http] tls_cert/tls_key
#   brokerClient.{caFile,certFile,keyFile} → the relay as a broker client, [broker] tls_*
#   broker.tls.{caFile,certFile,keyFile}   → the local RabbitMQ's AMQPS listener (ssl_options.*)
#   linkKeyFile                            → the link key, [broker] link_key_file
# The TOML and rabbitmq.conf are static files in the store, so they name the credentials by
# their absolute paths /run/credentials/<unit>.service/<id> (why that is the path the service
# sees: nix/lib/tls.nix). The services read the files once at start: after replacing a
# certificate or the link key, restart the unit that uses it.
#
# The link key (ARCHITECTURE.md, "Messages are authenticated with a shared link key") is one
# file, the same on the relay and on every appliance: with it every message the relay publishes
# is tagged and every message it receives must carry a valid tag. RabbitMQ never sees it. It is
# null by default, like the binary (no key: nothing tagged or checked), because all services
# must switch together: one with a key refuses every message of one without (which itself
# accepts anything). Set it together with the appliances' (the image's `comatching.site.linkKey`).
#
# Also (docs/operations.md §6): `backup` (a timer running `comatching-relay backup` as the
# relay's user, then an optional off-box command, nix/modules/relay-backup.sh), `litestream`
# (nixpkgs' services.litestream for relay.db, as the relay's user), LimitNOFILE= from
# `settings.http.max_connections`, and `broker.cluster` (a RabbitMQ cluster member,
# nix/lib/cluster.nix). The relay and the broker are independent: a cluster member may run the
# broker alone.
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
  unit = "comatching-relay";
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
      syncQueueExpiresH
      deadLetterMaxLength
      deadLetterTtlH
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

  # ---- TLS: credentials and the settings they render to (nix/lib/tls.nix) ----
  httpsCreds = clib.tls.httpsServer {
    inherit unit;
    what = "services.comatching-relay.https";
    inherit (cfg.https) certFile keyFile;
  };
  clientCreds = clib.tls.brokerClient {
    inherit unit;
    what = "services.comatching-relay.brokerClient";
    inherit (cfg.brokerClient) caFile certFile keyFile;
  };
  linkCreds = clib.tls.linkKey {
    inherit unit;
    what = "services.comatching-relay";
    file = cfg.linkKeyFile;
  };
  # The local broker's server certificate, as credentials of rabbitmq.service: its static user
  # `rabbitmq` reads them there, and they stay in place for as long as the unit runs (RabbitMQ
  # reads TLS files when listeners start and may again for later connections).
  brokerTlsFiles = {
    cacertfile = {
      id = "comatching-ca.pem";
      file = brk.tls.caFile;
      option = "caFile";
    };
    certfile = {
      id = "comatching-broker.pem";
      file = brk.tls.certFile;
      option = "certFile";
    };
    keyfile = {
      id = "comatching-broker.key";
      file = brk.tls.keyFile;
      option = "keyFile";
    };
  };
  serverCreds = clib.tls.credentials {
    unit = "rabbitmq";
    what = "services.comatching-relay.broker.tls";
    files = brokerTlsFiles;
  };
  localTls = brk.enable && brk.tls.enable;
  # The relay speaks TLS to the local broker unless plain AMQP stays on loopback for it.
  localClientTls = localTls && !brk.tls.plainLoopback;
  brokerListeners = clib.rabbitmq.listeners {
    inherit (brk) port tailnetAddress;
    # Incomplete TLS files fail an assertion below; until then render the plain listeners.
    tls =
      if localTls && serverCreds.errors == [ ] && lib.all (f: f.file != null) (builtins.attrValues brokerTlsFiles) then
        serverCreds.settings
        // {
          inherit (brk.tls) port plainLoopback;
        }
      else
        null;
  };
  # ---- a clustered broker (issue 15 §1) ----
  cl = brk.cluster;
  clusterArgs = {
    self = config.networking.hostName;
    inherit (cl) peers;
  };
  # The relay's broker URLs: this host's broker first, then the other members (same user,
  # scheme and port; their certificates must name them).
  brokerUrlFor =
    host:
    clib.tls.amqpUrl {
      user = "relay";
      inherit host;
      tls = cfg.brokerClient.caFile != null;
      port = if cfg.brokerClient.caFile != null then brk.tls.port else brk.port;
    };
  brokerUrls = map brokerUrlFor ([ "127.0.0.1" ] ++ lib.optionals (brk.enable && cl.enable) cl.peers);
  urlList = u: if builtins.isList u then u else [ u ];

  # ---- backups (issue 14 §3) ----
  bak = cfg.backup;
  backupUnit = "comatching-relay-backup";
  # The directory is a StateDirectory= of the backup unit, so it must be under /var/lib.
  backupStateDir = lib.removePrefix "/var/lib/" bak.directory;
  backupDirOk =
    lib.hasPrefix "/var/lib/" bak.directory
    && builtins.match "[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*" backupStateDir != null
    && builtins.match "(.*/)?[.][.]?(/.*)?" backupStateDir == null
    && backupStateDir != stateDir;
  postCommand =
    if bak.postCommand == null then
      null
    else
      pkgs.writeShellScript "comatching-relay-backup-post" bak.postCommand;
  dbPath = "/var/lib/${stateDir}/relay.db";

  # The relay's sandbox for a unit that is not a long-running server (no Restart=always on a
  # oneshot, no connection cap to size LimitNOFILE= for).
  oneshotSandbox = removeAttrs clib.systemd.serviceConfig [
    "Restart"
    "RestartSec"
    "LimitNOFILE"
  ];

  # ---- Litestream (issue 14 §3) ----
  ls = cfg.litestream;

  nullOrFile =
    example: description:
    mkOption {
      type = types.nullOr types.str;
      default = null;
      inherit example description;
    };

  # `comatching-relay admin …` for operators on the host, run as the service's own dynamic user
  # (same User= name, hence the same UID) so nothing in the state directory changes owner. It
  # needs no credentials: `admin` checks that the TLS settings are coherent but reads no
  # certificate and no link key (cloud-relay/src/main.rs: it only opens the database), so the
  # service's credential paths in the TOML do.
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
        [matching], [ledger], [points], [rate_limit], [auth], [sync], [dead_letters]; see
        cloud-relay/src/config.rs). Keys left
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
              description = ''
                Address of the API. HTTPS only when `https.certFile`/`keyFile` are set (then
                e.g. "0.0.0.0:443"), plain HTTP otherwise (keep that on loopback).
              '';
            };
            max_connections = mkOption {
              type = types.nullOr types.ints.positive;
              default = null;
              example = 10000;
              description = ''
                Cap on concurrent connections (the binary's default when null, 2048). The
                unit's LimitNOFILE= follows it: max_connections + 1024, or 4096 when unset.
              '';
            };
            tls_cert = mkOption {
              type = types.nullOr types.str;
              default = httpsCreds.settings.tls_cert;
              defaultText = literalExpression ''"/run/credentials/comatching-relay.service/https-cert.pem" if https.certFile is set, else null'';
              description = "PEM chain of the HTTPS listener as the relay reads it (the credential from `https.certFile`).";
            };
            tls_key = mkOption {
              type = types.nullOr types.str;
              default = httpsCreds.settings.tls_key;
              defaultText = literalExpression ''"/run/credentials/comatching-relay.service/https-key.pem" if https.keyFile is set, else null'';
              description = "Private key of the HTTPS listener as the relay reads it (the credential from `https.keyFile`).";
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
          sync = section {
            queue_expires_h = mkOption {
              type = types.ints.positive;
              default = brk.syncQueueExpiresH;
              defaultText = literalExpression "broker.syncQueueExpiresH";
              description = "Hours after which an appliance not heard from no longer holds the outbox back (its sync queue has expired on the broker by then).";
            };
          };
          dead_letters = section {
            max_length = mkOption {
              type = types.ints.positive;
              default = brk.deadLetterMaxLength;
              defaultText = literalExpression "broker.deadLetterMaxLength";
              description = "Most dead letters kept in comatching.dead (and the tally queue).";
            };
            message_ttl_h = mkOption {
              type = types.ints.positive;
              default = brk.deadLetterTtlH;
              defaultText = literalExpression "broker.deadLetterTtlH";
              description = "Hours a dead letter is kept.";
            };
          };
          broker = section {
            url = mkOption {
              type = types.either types.str (types.listOf types.str);
              default = if brk.enable && cl.enable then brokerUrls else builtins.head brokerUrls;
              defaultText = literalExpression ''
                "amqps://relay@127.0.0.1:''${toString broker.tls.port}/%2f" with brokerClient.caFile set,
                "amqp://relay@127.0.0.1:''${toString broker.port}/%2f" otherwise; with broker.cluster,
                a list: that URL, then the same for each of broker.cluster.peers'';
              description = ''
                AMQP URL without the password, or a list of them (a cluster's members, tried in
                turn). Set the full URL(s) in `environmentFile` as COMATCHING_RELAY__BROKER__URL
                (comma-separated for a list), with the same scheme: amqps:// when the
                brokerClient files are set.
              '';
            };
            tls_ca = mkOption {
              type = types.nullOr types.str;
              default = clientCreds.settings.tls_ca;
              defaultText = literalExpression ''"/run/credentials/comatching-relay.service/broker-ca.pem" if brokerClient.caFile is set, else null'';
              description = "The only CA the broker's certificate may chain to (the credential from `brokerClient.caFile`).";
            };
            tls_cert = mkOption {
              type = types.nullOr types.str;
              default = clientCreds.settings.tls_cert;
              defaultText = literalExpression ''"/run/credentials/comatching-relay.service/broker-cert.pem" if brokerClient.certFile is set, else null'';
              description = "Client certificate presented to the broker (the credential from `brokerClient.certFile`).";
            };
            tls_key = mkOption {
              type = types.nullOr types.str;
              default = clientCreds.settings.tls_key;
              defaultText = literalExpression ''"/run/credentials/comatching-relay.service/broker-key.pem" if brokerClient.keyFile is set, else null'';
              description = "Key of the client certificate (the credential from `brokerClient.keyFile`).";
            };
            link_key_file = mkOption {
              type = types.nullOr types.str;
              default = linkCreds.settings.link_key_file;
              defaultText = literalExpression ''"/run/credentials/comatching-relay.service/link.key" if linkKeyFile is set, else null'';
              description = "The link key as the relay reads it (the credential from `linkKeyFile`).";
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
        `COMATCHING_RELAY__BROKER__URL=amqps://relay:SECRET@127.0.0.1:5671/%2f` (amqp:// and
        port 5672 without broker TLS; the scheme must match `brokerClient`, or the relay
        refuses to start).
      '';
    };

    https = {
      certFile = nullOrFile "/var/lib/acme/api.example.org/fullchain.pem" ''
        PEM certificate chain (leaf first) for the relay's own HTTPS listener, a file outside the
        store (loaded as a systemd credential). Browsers trust only public CAs, so for the web
        app this comes from one, e.g. `security.acme` (then add "comatching-relay.service" to
        that certificate's `reloadServices`: the relay reads it once at start). Set with
        `keyFile`; the relay then serves HTTPS only (with HSTS) on `settings.http.listen`.
      '';
      keyFile = nullOrFile "/var/lib/acme/api.example.org/key.pem" "Private key of `https.certFile` (outside the store).";
    };

    brokerClient = {
      caFile = mkOption {
        type = types.nullOr types.str;
        default = if localClientTls then brk.tls.caFile else null;
        defaultText = literalExpression "broker.tls.caFile when the local broker speaks TLS to the relay, else null";
        example = "/var/lib/comatching-secrets/ca.pem";
        description = ''
          Our private CA's certificate (`comatching-relay pki init` → ca.pem), the only root the
          relay trusts for the broker's certificate. Setting it makes the default broker URL
          amqps://. Outside the store; loaded as a systemd credential.
        '';
      };
      certFile = nullOrFile "/var/lib/comatching-secrets/relay.pem" ''
        Client certificate the relay presents to the broker (`pki issue --name relay --kind
        client`), with `keyFile`. Required by a broker that demands client certificates, as the
        local one does with `broker.tls.enable` (unless `broker.tls.plainLoopback`).
      '';
      keyFile = nullOrFile "/var/lib/comatching-secrets/relay.key" "Key of `brokerClient.certFile` (outside the store).";
    };

    linkKeyFile = nullOrFile "/var/lib/comatching-secrets/link.key" ''
      The deployment's link key (`comatching-relay pki link-key --dir D` → D/link.key, 64 hex
      digits), a file outside the store loaded as a systemd credential. With it the relay tags
      every message it publishes (HMAC-SHA256, header `x-cm-mac`) and refuses every message it
      receives without a valid tag. Every appliance must have the same file (on the image:
      `comatching.site.linkKey`, provisioned as `link.key`); a service without it has all its
      messages refused by the others. Rotating: a new file on every service, then restart them.
    '';

    logFilter = mkOption {
      type = types.str;
      default = "info";
      description = "RUST_LOG filter.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the API port (from settings.http.listen; HTTPS with `https.*`) on all interfaces.";
    };

    backup = {
      enable = mkEnableOption ''
        scheduled online backups of relay.db: a timer runs `comatching-relay backup` as the
        relay's own user, keeps the newest `keep` files in `directory`, and then runs
        `postCommand` on the new file, if set'';

      interval = mkOption {
        type = types.str;
        default = "hourly";
        example = "*:0/15";
        description = ''
          When to take a backup (a systemd.time(7) calendar event: the timer's OnCalendar=). A
          run missed while the host was off is taken at the next boot (Persistent=).
        '';
      };

      keep = mkOption {
        type = types.ints.positive;
        default = 48;
        description = "How many backups to keep in `directory` (`--keep`); older ones are deleted after each backup.";
      };

      directory = mkOption {
        type = types.str;
        default = "/var/lib/comatching-relay-backups";
        description = ''
          Where the backups go. Must be under /var/lib: it is the backup unit's
          StateDirectory=, which systemd creates and hands to the relay's dynamic user (mount
          another disk there to keep backups off the relay's disk).
        '';
      };

      postCommand = mkOption {
        type = types.nullOr types.lines;
        default = null;
        example = ''rclone copyto "$1" "offbox:comatching-backups/$(basename "$1")"'';
        description = ''
          Shell commands run after each successful backup, to copy it off the box. The new
          file is the first argument (`$1`) and `$COMATCHING_BACKUP_FILE`. It runs in the
          backup unit: as the relay's dynamic user, in the relay's sandbox (network allowed,
          no home directory, everything read-only but the two state directories), with
          `postCommandPackages` on PATH and `postCommandEnvironmentFile` in the environment.
          A failure fails the unit (`systemctl --failed` shows it); the backup stays.
        '';
      };

      postCommandPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
        example = literalExpression "[ pkgs.rclone ]";
        description = "Packages on PATH for `postCommand`.";
      };

      postCommandEnvironmentFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/var/lib/comatching-secrets/offbox.env";
        description = ''
          A file outside the store with `KEY=value` lines for the backup unit's
          EnvironmentFile=: the off-box tool's credentials (e.g. rclone's
          `RCLONE_CONFIG_<REMOTE>_*` variables). Read by systemd as root.
        '';
      };
    };

    litestream = {
      enable = mkEnableOption ''
        continuous replication of relay.db with Litestream: nixpkgs' `services.litestream`,
        configured for the relay's database and run as the relay's own user, started and
        stopped with the relay'';

      replicaUrl = mkOption {
        type = types.str;
        example = "s3://comatching-backups/relay";
        description = ''
          Litestream replica URL (s3://, gs://, abs://, sftp://, file://…). No credentials in
          it (it ends up in the store): put them in `environmentFile`.
        '';
      };

      environmentFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/var/lib/comatching-secrets/litestream.env";
        description = ''
          `services.litestream.environmentFile`: e.g. `LITESTREAM_ACCESS_KEY_ID=…` and
          `LITESTREAM_SECRET_ACCESS_KEY=…`, outside the store.
        '';
      };
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
        description = "Plain AMQP port (on loopback, and on the tailnet address when set), unless `tls.enable`.";
      };

      tls = {
        enable = mkEnableOption ''
          AMQP over TLS only (port `tls.port`, on loopback and the tailnet address), with client
          certificates from our CA required (`ssl_options.verify = verify_peer`,
          `fail_if_no_peer_cert = true`) on top of the passwords. Plain AMQP is then off, and the
          tailnet firewall opens `tls.port` instead of `port`
        '';
        port = mkOption {
          type = types.port;
          default = 5671;
          description = "AMQPS port.";
        };
        caFile = nullOrFile "/var/lib/comatching-secrets/ca.pem" ''
          Our CA's certificate (`pki init` → ca.pem): clients must present a certificate it
          issued. Outside the store; loaded as a credential of rabbitmq.service.
        '';
        certFile = nullOrFile "/var/lib/comatching-secrets/broker.pem" ''
          The broker's server certificate (`pki issue --name broker --kind server`), whose
          names must cover every host clients dial: `--ip 127.0.0.1` for the relay, and the
          tailnet name and/or address for the appliances.
        '';
        keyFile = nullOrFile "/var/lib/comatching-secrets/broker.key" "Key of `tls.certFile` (outside the store).";
        plainLoopback = mkOption {
          type = types.bool;
          default = false;
          description = ''
            Keep plain AMQP on 127.0.0.1:`port` for the relay on this host (which then needs no
            client certificate); the tailnet still gets TLS only. Off: TLS everywhere.
          '';
        };
      };

      cluster = {
        enable = mkEnableOption ''
          this broker as one member of a RabbitMQ cluster (issue 15): peer discovery by
          `cluster_formation.classic_config.nodes` (this host and `peers`), the Erlang cookie
          from `cookieFile` as a systemd credential, `cluster_partition_handling =
          pause_minority`, and the Erlang distribution ports opened on `interface`. Every member
          sets the same options with its own `peers`; a member that runs no relay sets
          `broker.enable` without `services.comatching-relay.enable`'';

        peers = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [
            "comatching-broker-2"
            "comatching-broker-3"
          ];
          description = ''
            Host names of the other members (not this one), as every member resolves them (the
            tailnet's MagicDNS names). Node names are rabbit@<host name>; this node's is
            rabbit@`networking.hostName`. At least 2 (3 members), an even member count is refused.
          '';
        };

        cookieFile = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "/var/lib/comatching-secrets/erlang-cookie";
          description = ''
            The Erlang cookie shared by all members (20-255 letters and digits, the same file on
            every member), outside the store. Loaded as a credential of rabbitmq.service and
            installed as the node's ~/.erlang.cookie before it starts.
          '';
        };
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
        description = "x-delivery-limit of comatching.control (must equal the binaries'). Match requests have no delivery limit: they expire with their deadline.";
      };

      syncDeliveryLimit = mkOption {
        type = types.ints.positive;
        default = 5;
        description = "x-delivery-limit of the per-appliance sync queues (the appliances' [sync] delivery_limit).";
      };

      syncQueueExpiresH = mkOption {
        type = types.ints.positive;
        default = 72;
        description = "x-expires of the per-appliance sync queues, in hours: the appliances' and the relay's [sync] queue_expires_h (the relay's is set from this).";
      };

      deadLetterMaxLength = mkOption {
        type = types.ints.positive;
        default = 10000;
        description = "Most dead letters kept in comatching.dead and comatching.dead.tally (the relay's [dead_letters] max_length is set from this).";
      };

      deadLetterTtlH = mkOption {
        type = types.ints.positive;
        default = 24;
        description = "Hours a dead letter is kept (the relay's [dead_letters] message_ttl_h is set from this).";
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

  # The relay, and a broker: either may run without the other (a cluster member that runs no
  # relay sets broker.enable alone).
  config = mkMerge [
    (mkIf cfg.enable {
      # The binary refuses unknown sections; a section added to the Rust config but not yet to
      # nix/lib/settings.nix only warns here, so the module never blocks a valid new section.
      warnings = map (
        sec: "services.comatching-relay.settings.${sec}: not a section the relay is known to accept (nix/lib/settings.nix); it refuses unknown fields."
      ) (clib.settings.unknownSections clib.settings.relaySections cfg.settings);

      assertions = [
        {
          assertion = lib.all (u: builtins.match "[a-z0-9+]+://[^/@:]*:[^/@]*@.*" u == null) (urlList cfg.settings.broker.url);
          message = "services.comatching-relay.settings.broker.url must not contain a password (it would land in the Nix store); set COMATCHING_RELAY__BROKER__URL in environmentFile.";
        }
        {
          assertion =
            let
              urls = urlList cfg.settings.broker.url;
              prefix = lib.head (lib.splitString "://" (lib.head urls)) + "://";
            in
            urls != [ ] && lib.all (lib.hasPrefix prefix) urls;
          message = "services.comatching-relay.settings.broker.url: a list must not be empty, and every entry must use the same scheme (all amqp:// or all amqps://).";
        }
      ]
      # The rules the binary checks at start (nix/lib/tls.nix), so they fail here instead.
      ++ map (message: {
        assertion = false;
        inherit message;
      }) (
        httpsCreds.errors
        ++ clientCreds.errors
        ++ linkCreds.errors
        ++ map (m: "services.comatching-relay.settings: ${m}") (
          clib.tls.httpErrors cfg.settings.http ++ clib.tls.brokerErrors cfg.settings.broker
        )
      );

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
            # One descriptor per connection up to the cap, plus headroom (nix/lib/systemd.nix).
            LimitNOFILE = clib.systemd.nofileFor cfg.settings.http.max_connections;
            StateDirectory = stateDir;
            WorkingDirectory = "%S/${stateDir}";
            # Creates or upgrades the database; idempotent.
            ExecStartPre = "${exe} migrate --config ${configFile}";
            ExecStart = "${exe} serve --config ${configFile}";
            EnvironmentFile = optional (cfg.environmentFile != null) cfg.environmentFile;
            # Certificates, keys and the link key, readable by the dynamic user under
            # /run/credentials/.
            LoadCredential =
              httpsCreds.loadCredential ++ clientCreds.loadCredential ++ linkCreds.loadCredential;
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
    })

    (mkIf brk.enable {
      assertions = [
        {
          assertion = lib.all (u: builtins.elem u brokerUsers) (builtins.attrNames brk.passwordFiles);
          message = "services.comatching-relay.broker.passwordFiles names users that do not exist; known: ${toString brokerUsers}.";
        }
      ]
      ++ lib.optionals brk.tls.enable (
        [
          {
            assertion = lib.all (f: f.file != null) (builtins.attrValues brokerTlsFiles);
            message = "services.comatching-relay.broker.tls.enable needs caFile, certFile and keyFile.";
          }
          {
            assertion =
              !cfg.enable || brk.tls.plainLoopback || (cfg.brokerClient.certFile != null && cfg.brokerClient.keyFile != null);
            message = "services.comatching-relay.broker.tls: the broker refuses clients without a certificate; set brokerClient.certFile and keyFile (`comatching-relay pki issue --name relay --kind client`), or broker.tls.plainLoopback.";
          }
          {
            assertion = brk.tls.port != brk.port;
            message = "services.comatching-relay.broker.tls.port must differ from broker.port.";
          }
        ]
        ++ map (message: {
          assertion = false;
          inherit message;
        }) serverCreds.errors
      );

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
        # Sized for the relay's 1 GiB box (quorum WAL, absolute memory watermark); the same
        # items as scripts/broker.sh. nix/lib/rabbitmq.nix says why.
        // clib.rabbitmq.smallBoxConfigItems
        # Plain listeners on loopback and the tailnet address; or, with tls.enable, TLS ones
        # with `listeners.tcp = none` (or plain on loopback only). nix/lib/rabbitmq.nix.
        // brokerListeners.configItems;
      };

      # The broker's certificate and key as credentials of its own unit: systemd copies them
      # (as root) into /run/credentials/rabbitmq.service/, readable by the `rabbitmq` user,
      # which rabbitmq.conf names (brokerListeners). So the operator's files can stay root-only
      # and outside the store, as with the passwords. Replacing them needs a broker restart.
      systemd.services.rabbitmq = mkIf localTls {
        serviceConfig.LoadCredential = serverCreds.loadCredential;
      };

      # Erlang distribution (25672) and epmd (4369) are not bound to loopback: the node is
      # rabbit@<hostName>, which NixOS resolves to 127.0.0.2, and rabbitmqctl must reach it.
      # The firewall opens neither port; only AMQP faces the tailnet.

      # Lets RabbitMQ bind the tailnet address before tailscaled has brought it up.
      boot.kernel.sysctl = mkIf (brk.tailnetAddress != null) {
        "net.ipv4.ip_nonlocal_bind" = 1;
      };

      # Only AMQP faces the tailnet: the TLS port with tls.enable, the plain one otherwise.
      networking.firewall.interfaces = mkIf (brokerListeners.tailnetPort != null) {
        ${brk.interface}.allowedTCPPorts = [ brokerListeners.tailnetPort ];
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

      systemd.services.comatching-relay = mkIf cfg.enable {
        wants = [ "comatching-broker-users.service" ];
        after = [
          "rabbitmq.service"
          "comatching-broker-users.service"
        ];
      };
    })

    (mkIf (brk.enable && cl.enable) {
      assertions = [
        {
          assertion = cl.cookieFile != null && lib.hasPrefix "/" cl.cookieFile && !(lib.hasPrefix "/nix/store/" cl.cookieFile);
          message = "services.comatching-relay.broker.cluster.cookieFile must be an absolute path outside the Nix store (the Erlang cookie grants full control of every member).";
        }
        {
          assertion = brk.tailnetAddress != null;
          message = "services.comatching-relay.broker.cluster needs broker.tailnetAddress: the members' clients fail over to each other over the tailnet.";
        }
        {
          assertion = (config.services.rabbitmq.unsafeCookie or "") == "";
          message = "services.comatching-relay.broker.cluster: leave services.rabbitmq.unsafeCookie empty (it would put the cookie in the store and fight cookieFile).";
        }
      ]
      ++ map (m: {
        assertion = false;
        message = "services.comatching-relay.broker.cluster: ${m}";
      }) (clib.cluster.errors clusterArgs);

      services.rabbitmq.configItems = clib.cluster.configItems clusterArgs;

      systemd.services.rabbitmq = {
        serviceConfig.LoadCredential = optional (cl.cookieFile != null) "erlang-cookie:${cl.cookieFile}";
        # As the `rabbitmq` user, before the node starts; the node and rabbitmqctl read it there.
        preStart = lib.mkAfter ''
          ${pkgs.bash}/bin/bash ${./erlang-cookie.sh} ${lib.escapeShellArg config.services.rabbitmq.dataDir}
        '';
      };

      # The Erlang distribution between the members, on the tailnet only (WireGuard encrypts it;
      # the cookie authenticates it). AMQP is opened there already.
      networking.firewall.interfaces.${brk.interface}.allowedTCPPorts = clib.cluster.distributionPorts;
    })

    (mkIf (cfg.enable && bak.enable) {
      assertions = [
        {
          assertion = backupDirOk;
          message = "services.comatching-relay.backup.directory must be a directory under /var/lib other than the relay's own (it becomes the backup unit's StateDirectory=), got ${bak.directory}.";
        }
      ];

      # Runs as the relay's user: DynamicUser= with the same User= name gets the same UID, so
      # it reads relay.db where the relay keeps it and the files it writes belong to that user.
      systemd.services.${backupUnit} = {
        description = "COMATCHING Edge relay database backup";
        after = [ "comatching-relay.service" ];
        path = [
          pkgs.coreutils
          pkgs.gnugrep
          pkgs.jq
        ]
        ++ bak.postCommandPackages;
        environment.RUST_LOG = cfg.logFilter;
        # Nothing to back up before the relay's first `migrate`.
        unitConfig.ConditionPathExists = dbPath;
        serviceConfig = oneshotSandbox // {
          Type = "oneshot";
          User = stateDir;
          StateDirectory = [
            stateDir
            backupStateDir
          ];
          WorkingDirectory = "%S/${stateDir}";
          EnvironmentFile = optional (
            bak.postCommandEnvironmentFile != null
          ) bak.postCommandEnvironmentFile;
          ExecStart = lib.escapeShellArgs (
            [
              "${pkgs.bash}/bin/bash"
              "${./relay-backup.sh}"
              exe
              "${configFile}"
              bak.directory
              (toString bak.keep)
            ]
            ++ optional (postCommand != null) "${postCommand}"
          );
        };
      };

      systemd.timers.${backupUnit} = {
        description = "Scheduled COMATCHING Edge relay database backups";
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnCalendar = bak.interval;
          Persistent = true;
          AccuracySec = "1min";
        };
      };
    })

    (mkIf (cfg.enable && ls.enable) {
      assertions = [
        {
          assertion = builtins.match "[a-z0-9+]+://[^/@:]*:[^/@]*@.*" ls.replicaUrl == null;
          message = "services.comatching-relay.litestream.replicaUrl must not contain credentials (it would land in the Nix store); use litestream.environmentFile.";
        }
      ];

      services.litestream = {
        enable = true;
        inherit (ls) environmentFile;
        # relay.db is in WAL mode with a 10 s busy timeout and only automatic (PASSIVE)
        # checkpoints, which is what Litestream needs (docs/operations.md, "Continuous
        # replication"). `replicas` with one entry is the form Litestream 0.3 reads and 0.5
        # still accepts.
        settings.dbs = [
          {
            path = dbPath;
            replicas = [ { url = ls.replicaUrl; } ];
          }
        ];
      };

      # nixpkgs runs Litestream as its own static user, which cannot enter the relay's private
      # state directory (a DynamicUser's, mode 0700). Run it as the relay's user instead, in
      # the relay's sandbox, and tie it to the relay: it starts with it and stops with it, so a
      # `restore` (done with the relay stopped) never races a running replication.
      systemd.services.litestream = {
        wantedBy = [ "comatching-relay.service" ];
        bindsTo = [ "comatching-relay.service" ];
        after = [ "comatching-relay.service" ];
        unitConfig = clib.systemd.unitConfig;
        serviceConfig = removeAttrs clib.systemd.serviceConfig [ "LimitNOFILE" ] // {
          User = lib.mkForce stateDir;
          Group = lib.mkForce stateDir;
          StateDirectory = stateDir;
          WorkingDirectory = "%S/${stateDir}";
        };
      };
    })

    (mkIf (brk.enable && brk.tailnetAddress != null && config.services.tailscale.enable) {
      systemd.services.rabbitmq = {
        wants = [ "tailscaled.service" ];
        after = [ "tailscaled.service" ];
      };
    })
  ];
}
