# What the binaries accept in their TOML config files. Both parse with `deny_unknown_fields`, so a
# section they do not know makes them refuse to start; the NixOS modules assert against these
# lists at evaluation time instead. Plain Nix (no nixpkgs), tested in nix/tests/settings.nix.
let
  inherit (builtins) attrNames filter elem;
in
rec {
  # comatching-relay: cloud-relay/src/config.rs
  relaySections = [
    "http"
    "storage"
    "broker"
    "matching"
    "ledger"
    "points"
    "rate_limit"
    "auth"
    "sync"
    "dead_letters"
  ];

  # comatching-appliance: appliance/src/node/config.rs
  applianceSections = [
    "appliance"
    "http"
    "storage"
    "broker"
    "sync"
    "matching"
    "tailscale"
  ];

  # Sections of `settings` the binary would refuse.
  unknownSections = known: settings: filter (s: !(elem s known)) (attrNames settings);

  # Environment variable that overrides one key (the binaries read
  # PREFIX__SECTION__KEY, upper-cased), e.g. for secrets kept out of the store.
  envName =
    prefix: section: key:
    builtins.concatStringsSep "__" (
      map (s: builtins.replaceStrings lowers uppers s) [
        prefix
        section
        key
      ]
    );

  # builtins has no toUpper; the 26 letters as lists for replaceStrings.
  lowers = builtins.genList (i: builtins.substring i 1 "abcdefghijklmnopqrstuvwxyz") 26;
  uppers = builtins.genList (i: builtins.substring i 1 "ABCDEFGHIJKLMNOPQRSTUVWXYZ") 26;

  relayEnvPrefix = "COMATCHING_RELAY";
  applianceEnvPrefix = "COMATCHING_APPLIANCE";
}
