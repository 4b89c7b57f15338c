# Evaluation tests for nix/lib/systemd.nix: the hardening issue 6 asks for is present and sane.
let
  sd = import ../lib/systemd.nix;
  sc = sd.serviceConfig;
in
import ./harness.nix [
  {
    name = "required-keys-present";
    actual = builtins.filter (k: !(sc ? ${k})) sd.required;
    expected = [ ];
  }
  {
    name = "required-values";
    actual = {
      inherit (sc)
        DynamicUser
        ProtectSystem
        ProtectHome
        PrivateTmp
        NoNewPrivileges
        Restart
        ;
    };
    expected = {
      DynamicUser = true;
      ProtectSystem = "strict";
      ProtectHome = true;
      PrivateTmp = true;
      NoNewPrivileges = true;
      Restart = "always";
    };
  }
  {
    name = "address-families-ip-and-unix-only";
    actual = builtins.sort builtins.lessThan sc.RestrictAddressFamilies;
    expected = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
    ];
  }
  {
    name = "no-capabilities";
    actual = [
      sc.CapabilityBoundingSet
      sc.AmbientCapabilities
    ];
    expected = [
      ""
      ""
    ];
  }
  {
    # The relay's LimitNOFILE=: its connection cap plus headroom, or a fixed 4096 ≥ the
    # binary's default cap (2048) + 1024.
    name = "nofile-follows-the-connection-cap";
    actual = map sd.nofileFor [
      null
      2048
      10000
    ];
    expected = [
      4096
      3072
      11024
    ];
  }
  {
    name = "never-stops-restarting";
    actual = sd.unitConfig.StartLimitIntervalSec;
    expected = 0;
  }
]
