# The systemd sandbox and restart policy shared by the relay and appliance units, as plain
# attribute sets (no nixpkgs) so nix/tests/systemd.nix can check them offline. Option names are
# those of systemd.exec(5), systemd.service(5) and systemd.unit(5); the NixOS modules merge them
# into `systemd.services.<name>.serviceConfig` / `.unitConfig`.
{
  serviceConfig = {
    # A fresh UID per start, no login, owns only its StateDirectory (set per unit).
    DynamicUser = true;
    StateDirectoryMode = "0700";
    UMask = "0077";

    # File system: everything read-only except the state directory; no /home, private /tmp.
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";

    # No privileges, ever.
    NoNewPrivileges = true;
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    RestrictRealtime = true;
    RestrictNamespaces = true;
    PrivateUsers = true;

    # Kernel and host state stay out of reach.
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    RemoveIPC = true;

    # IPv4/IPv6 for HTTP and AMQP, AF_UNIX for journald, sd_notify and the tailscaled socket.
    RestrictAddressFamilies = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
    ];
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
      "~@resources"
    ];
    SystemCallErrorNumber = "EPERM";

    # Come back whatever happened; the festival has no operator at the console.
    Restart = "always";
    RestartSec = "2s";
    LimitNOFILE = 65536;
  };

  # LimitNOFILE= for a server with a cap on concurrent connections (the relay's
  # `http.max_connections`): one descriptor per connection plus 1024 for everything else
  # (SQLite's files, the broker connection, the runtime, the journal). Without a cap in the
  # settings, the binary's default cap applies (2048), for which 4096 leaves the same headroom
  # and then some. The soft and hard limit both; systemd's own default soft limit is 1024,
  # which a few laptops holding connections open would exhaust (issue 13).
  nofileFor = maxConnections: if maxConnections == null then 4096 else maxConnections + 1024;

  unitConfig = {
    # Never give up restarting (the default would stop after 5 starts in 10 s).
    StartLimitIntervalSec = 0;
  };

  # Keys every unit built from `serviceConfig` must keep; nix/tests/systemd.nix pins them so a
  # refactor cannot silently drop one (issue 6 lists these).
  required = [
    "DynamicUser"
    "ProtectSystem"
    "ProtectHome"
    "PrivateTmp"
    "NoNewPrivileges"
    "RestrictAddressFamilies"
    "Restart"
  ];
}
