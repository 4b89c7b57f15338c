# Evaluation tests for the relay module's units (nix/modules/relay.nix) through the module
# evaluator of nix/tests/stubs/: scheduled backups and the off-box command (issue 14 §3),
# Litestream (issue 14 §3), LimitNOFILE= sized to the connection cap (issue 13 §1), and the
# clustered broker (issue 15 §1). What relay-backup.sh does with its arguments is tested in
# nix/tests/scripts.sh.
let
  relayWith = import ./stubs/relay.nix;
  relay = settings: relayWith { inherit settings; };
  plain = relay { };
  words = s: builtins.filter (w: builtins.isString w && w != "") (builtins.split " " s);

  withBackup = relay {
    backup = {
      enable = true;
      postCommand = ''rclone copyto "$1" "offbox:b/$(basename "$1")"'';
      postCommandPackages = [ (import ./stubs/pkgs.nix).rclone ];
      postCommandEnvironmentFile = "/var/lib/comatching-secrets/offbox.env";
    };
  };
  backupUnit = withBackup.config.systemd.services.comatching-relay-backup;
  backupArgs = words backupUnit.serviceConfig.ExecStart;
  defaultBackup = relay { backup.enable = true; };
  defaultArgs = words defaultBackup.config.systemd.services.comatching-relay-backup.serviceConfig.ExecStart;
  nth = n: xs: builtins.elemAt xs n;

  withLitestream = relay {
    litestream = {
      enable = true;
      replicaUrl = "s3://comatching-backups/relay";
      environmentFile = "/var/lib/comatching-secrets/litestream.env";
    };
  };
  lsUnit = withLitestream.config.systemd.services.litestream;

  clusterSettings = {
    brokerClient = {
      certFile = "/var/lib/comatching-secrets/relay.pem";
      keyFile = "/var/lib/comatching-secrets/relay.key";
    };
    broker = {
      enable = true;
      tailnetAddress = "100.90.1.2";
      tls = {
        enable = true;
        caFile = "/var/lib/comatching-secrets/ca.pem";
        certFile = "/var/lib/comatching-secrets/broker.pem";
        keyFile = "/var/lib/comatching-secrets/broker.key";
      };
      cluster = {
        enable = true;
        peers = [
          "comatching-broker-2"
          "comatching-broker-3"
        ];
        cookieFile = "/var/lib/comatching-secrets/erlang-cookie";
      };
    };
  };
  cluster = relay clusterSettings;
in
import ./harness.nix [
  {
    name = "plain-relay-evaluates";
    actual = plain.failedAssertions;
    expected = [ ];
  }
  {
    name = "backup:off-by-default";
    actual = {
      service = plain.defined (plain.config.systemd.services.comatching-relay-backup or null);
      timer = plain.defined (plain.config.systemd.timers.comatching-relay-backup or null);
      litestream = plain.defined (plain.config.services.litestream or null);
      stillDefinedWhenOn = defaultBackup.defined defaultBackup.config.systemd.timers.comatching-relay-backup;
    };
    expected = {
      service = false;
      timer = false;
      litestream = false;
      stillDefinedWhenOn = true;
    };
  }
  {
    name = "backup:timer-defaults";
    actual = defaultBackup.config.systemd.timers.comatching-relay-backup;
    expected = {
      description = "Scheduled COMATCHING Edge relay database backups";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = "hourly";
        Persistent = true;
        AccuracySec = "1min";
      };
    };
  }
  {
    # relay-backup.sh RELAY_EXE CONFIG DIRECTORY KEEP [POST]: the relay's binary and config.
    name = "backup:runs-the-relays-backup-with-its-config";
    actual = {
      exe = nth 2 defaultArgs;
      config = nth 3 defaultArgs;
      directory = nth 4 defaultArgs;
      keep = nth 5 defaultArgs;
      noPost = builtins.length defaultArgs;
    };
    expected = {
      exe = "/nix/store/00000000000000000000000000000000-comatching-relay/bin/comatching-relay";
      config = "/nix/store/00000000000000000000000000000000-comatching-relay.toml";
      directory = "/var/lib/comatching-relay-backups";
      keep = "48";
      noPost = 6;
    };
  }
  {
    name = "backup:same-config-as-the-service";
    actual = builtins.elem (nth 3 defaultArgs) (words defaultBackup.config.systemd.services.comatching-relay.serviceConfig.ExecStart);
    expected = true;
  }
  {
    # The relay's dynamic user (same User= name → same UID) with both state directories, in
    # the relay's sandbox, and a oneshot never restarts forever.
    name = "backup:as-the-relays-user";
    actual = {
      inherit (backupUnit.serviceConfig)
        DynamicUser
        User
        StateDirectory
        Type
        ProtectSystem
        NoNewPrivileges
        ;
      restart = backupUnit.serviceConfig ? Restart;
      condition = backupUnit.unitConfig.ConditionPathExists;
    };
    expected = {
      DynamicUser = true;
      User = "comatching-relay";
      StateDirectory = [
        "comatching-relay"
        "comatching-relay-backups"
      ];
      Type = "oneshot";
      ProtectSystem = "strict";
      NoNewPrivileges = true;
      restart = false;
      condition = "/var/lib/comatching-relay/relay.db";
    };
  }
  {
    name = "backup:post-command";
    actual = {
      last = nth 6 backupArgs;
      env = backupUnit.serviceConfig.EnvironmentFile;
      path = map (p: p.name) backupUnit.path;
    };
    expected = {
      last = "/nix/store/00000000000000000000000000000000-comatching-relay-backup-post";
      env = [ "/var/lib/comatching-secrets/offbox.env" ];
      path = [
        "coreutils"
        "gnugrep"
        "jq"
        "rclone"
      ];
    };
  }
  {
    name = "backup:keep-interval-directory";
    actual =
      let
        r = relay {
          backup = {
            enable = true;
            keep = 7;
            interval = "*:0/15";
            directory = "/var/lib/offsite/relay";
          };
        };
        a = words r.config.systemd.services.comatching-relay-backup.serviceConfig.ExecStart;
      in
      {
        keep = nth 5 a;
        dir = nth 4 a;
        stateDirs = r.config.systemd.services.comatching-relay-backup.serviceConfig.StateDirectory;
        calendar = r.config.systemd.timers.comatching-relay-backup.timerConfig.OnCalendar;
        ok = r.failedAssertions;
      };
    expected = {
      keep = "7";
      dir = "/var/lib/offsite/relay";
      stateDirs = [
        "comatching-relay"
        "offsite/relay"
      ];
      calendar = "*:0/15";
      ok = [ ];
    };
  }
  {
    # Outside /var/lib the dynamic user could not own it; the relay's own directory would mix
    # backups with the live database.
    name = "backup:directory-must-be-a-state-directory";
    actual = map (d: builtins.length (relay {
      backup = {
        enable = true;
        directory = d;
      };
    }).failedAssertions) [
      "/srv/backups"
      "/var/lib/comatching-relay"
      "/var/lib/../etc"
      "/var/lib/ok-dir"
    ];
    expected = [
      1
      1
      1
      0
    ];
  }
  {
    # issue 13 §1: the unit's descriptor limit follows http.max_connections.
    name = "nofile:follows-max-connections";
    actual =
      let
        capped = relay { settings.http.max_connections = 10000; };
        toml = builtins.fromTOML capped.config.environment.etc."comatching/relay.toml".source.text;
      in
      {
        default = plain.config.systemd.services.comatching-relay.serviceConfig.LimitNOFILE;
        capped = capped.config.systemd.services.comatching-relay.serviceConfig.LimitNOFILE;
        rendered = toml.http.max_connections;
        unsetNotRendered = (builtins.fromTOML plain.config.environment.etc."comatching/relay.toml".source.text).http ? max_connections;
      };
    expected = {
      default = 4096;
      capped = 11024;
      rendered = 10000;
      unsetNotRendered = false;
    };
  }
  {
    name = "cluster:rabbitmq-config-items";
    actual = removeAttrs cluster.config.services.rabbitmq.configItems [
      "definitions.import_backend"
      "definitions.local.path"
      "definitions.skip_if_unchanged"
      "loopback_users.guest"
    ];
    expected = {
      "cluster_formation.peer_discovery_backend" = "classic_config";
      "cluster_formation.classic_config.nodes.1" = "rabbit@comatching-relay";
      "cluster_formation.classic_config.nodes.2" = "rabbit@comatching-broker-2";
      "cluster_formation.classic_config.nodes.3" = "rabbit@comatching-broker-3";
      "cluster_partition_handling" = "pause_minority";
      "listeners.ssl.1" = "127.0.0.1:5671";
      "listeners.ssl.2" = "100.90.1.2:5671";
      "listeners.tcp" = "none";
      "ssl_options.cacertfile" = "/run/credentials/rabbitmq.service/comatching-ca.pem";
      "ssl_options.certfile" = "/run/credentials/rabbitmq.service/comatching-broker.pem";
      "ssl_options.keyfile" = "/run/credentials/rabbitmq.service/comatching-broker.key";
      "ssl_options.verify" = "verify_peer";
      "ssl_options.fail_if_no_peer_cert" = "true";
      # The small-box limits (nix/lib/rabbitmq.nix), on every broker node.
      "raft.wal_max_size_bytes" = "67108864";
      "vm_memory_high_watermark.absolute" = "314572800";
    };
  }
  {
    # The cookie is a credential of the broker's unit, installed by a script that reads it from
    # there: never in the store, never on a command line.
    name = "cluster:cookie-as-a-credential";
    actual =
      let
        u = cluster.config.systemd.services.rabbitmq;
      in
      {
        credentials = u.serviceConfig.LoadCredential;
        installs = builtins.match ".*bash .*erlang-cookie.sh /var/lib/rabbitmq.*" u.preStart != null;
        cookieNotInConfig = builtins.match ".*erlang-cookie-secret.*" (builtins.toJSON cluster.config.services.rabbitmq) == null;
      };
    expected = {
      credentials = [
        "comatching-ca.pem:/var/lib/comatching-secrets/ca.pem"
        "comatching-broker.pem:/var/lib/comatching-secrets/broker.pem"
        "comatching-broker.key:/var/lib/comatching-secrets/broker.key"
        "erlang-cookie:/var/lib/comatching-secrets/erlang-cookie"
      ];
      installs = true;
      cookieNotInConfig = true;
    };
  }
  {
    name = "cluster:distribution-ports-on-the-tailnet-only";
    actual = {
      tailnet = cluster.config.networking.firewall.interfaces.tailscale0.allowedTCPPorts;
      global = cluster.config.networking.firewall.allowedTCPPorts;
    };
    expected = {
      tailnet = [
        5671
        4369
        25672
      ];
      global = [ ];
    };
  }
  {
    # The relay tries its own broker first, then the other members, and the TOML says so.
    name = "cluster:relay-urls-list-every-member";
    actual = (builtins.fromTOML cluster.config.environment.etc."comatching/relay.toml".source.text).broker.url;
    expected = [
      "amqps://relay@127.0.0.1:5671/%2f"
      "amqps://relay@comatching-broker-2:5671/%2f"
      "amqps://relay@comatching-broker-3:5671/%2f"
    ];
  }
  {
    name = "cluster:single-url-without-cluster";
    actual = (builtins.fromTOML plain.config.environment.etc."comatching/relay.toml".source.text).broker.url;
    expected = "amqp://relay@127.0.0.1:5672/%2f";
  }
  {
    # A member that runs no relay: the broker and its cluster settings, no relay unit.
    name = "cluster:broker-only-member";
    actual =
      let
        m = relayWith {
          settings = clusterSettings // {
            broker = clusterSettings.broker // {
              cluster = clusterSettings.broker.cluster // {
                peers = [
                  "comatching-relay"
                  "comatching-broker-3"
                ];
              };
            };
          };
          extra =
            { lib, ... }:
            {
              services.comatching-relay.enable = lib.mkForce false;
              networking.hostName = "comatching-broker-2";
            };
        };
      in
      {
        relay = m.defined (m.config.systemd.services.comatching-relay or null);
        users = m.defined m.config.systemd.services.comatching-broker-users.serviceConfig;
        first = m.config.services.rabbitmq.configItems."cluster_formation.classic_config.nodes.1";
        asserts = m.failedAssertions;
      };
    expected = {
      relay = false;
      users = true;
      first = "rabbit@comatching-broker-2";
      asserts = [ ];
    };
  }
  {
    name = "cluster:refuses-unsafe-setups";
    actual = map (s: builtins.length (relay s).failedAssertions) [
      (clusterSettings // { broker = clusterSettings.broker // { cluster = clusterSettings.broker.cluster // { peers = [ "comatching-broker-2" ]; }; }; })
      (clusterSettings // { broker = clusterSettings.broker // { cluster = clusterSettings.broker.cluster // { cookieFile = null; }; }; })
      (clusterSettings // { broker = clusterSettings.broker // { tailnetAddress = null; }; })
      clusterSettings
    ];
    expected = [
      2
      1
      1
      0
    ];
  }
  {
    name = "cluster:password-in-any-url-refused";
    actual = builtins.length (relay (clusterSettings // {
      settings.broker.url = [
        "amqps://relay@127.0.0.1:5671/%2f"
        "amqps://relay:secret@comatching-broker-2:5671/%2f"
      ];
    })).failedAssertions;
    expected = 1;
  }
  {
    name = "cluster:mixed-schemes-refused";
    actual = builtins.length (relay (clusterSettings // {
      settings.broker.url = [
        "amqps://relay@127.0.0.1:5671/%2f"
        "amqp://relay@comatching-broker-2:5672/%2f"
      ];
    })).failedAssertions;
    expected = 1;
  }
  {
    name = "litestream:settings";
    actual = withLitestream.config.services.litestream;
    expected = {
      enable = true;
      environmentFile = "/var/lib/comatching-secrets/litestream.env";
      settings.dbs = [
        {
          path = "/var/lib/comatching-relay/relay.db";
          replicas = [ { url = "s3://comatching-backups/relay"; } ];
        }
      ];
    };
  }
  {
    # The YAML nixpkgs writes is this JSON's superset: the same document, and the path is the
    # file the relay opens (storage.data_dir + relay.db).
    name = "litestream:config-names-the-relays-database";
    actual =
      let
        doc = builtins.fromJSON (builtins.toJSON withLitestream.config.services.litestream.settings);
      in
      (builtins.head doc.dbs).path == "${withLitestream.config.services.comatching-relay.settings.storage.data_dir}/relay.db";
    expected = true;
  }
  {
    name = "litestream:runs-as-the-relays-user-bound-to-it";
    actual = {
      inherit (lsUnit.serviceConfig)
        DynamicUser
        User
        Group
        StateDirectory
        ProtectSystem
        ;
      inherit (lsUnit) bindsTo after wantedBy;
    };
    expected = {
      DynamicUser = true;
      User = "comatching-relay";
      Group = "comatching-relay";
      StateDirectory = "comatching-relay";
      ProtectSystem = "strict";
      bindsTo = [ "comatching-relay.service" ];
      after = [ "comatching-relay.service" ];
      wantedBy = [ "comatching-relay.service" ];
    };
  }
  {
    name = "litestream:refuses-credentials-in-the-url";
    actual = builtins.length (relay {
      litestream = {
        enable = true;
        replicaUrl = "sftp://backup:hunter2@host/relay";
      };
    }).failedAssertions;
    expected = 1;
  }
]
