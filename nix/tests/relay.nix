# Evaluation tests for the relay module's units (nix/modules/relay.nix) through the module
# evaluator of nix/tests/stubs/: scheduled backups and the off-box command (issue 14 §3),
# Litestream (issue 14 §3), LimitNOFILE= sized to the connection cap (issue 13 §1), and the
# clustered broker (issue 15 §1). What relay-backup.sh does with its arguments is tested in
# nix/tests/scripts.sh.
let
  relay = import ./stubs/relay.nix;
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
