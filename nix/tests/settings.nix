# Evaluation tests for nix/lib/settings.nix and for rendering the binaries' config files.
let
  s = import ../lib/settings.nix;
  inherit (import ../lib/toml.nix) render;

  # The sections must match the Rust Config structs (both deny unknown fields).
  source = path: builtins.readFile (../.. + "/${path}");
  # Field names of `pub struct Config { pub a: A, ... }` in a Rust source.
  configFields =
    src:
    let
      m = builtins.match ".*pub struct Config \\{([^}]*)}.*" src;
      body = if m == null then "" else builtins.head m;
      parts = builtins.split "pub ([a-z_]+):" body;
    in
    builtins.concatMap (p: if builtins.isList p then p else [ ]) parts;
  # Elements of `xs` that are not in `known`.
  missingIn = known: xs: builtins.filter (x: !(builtins.elem x known)) xs;
in
import ./harness.nix [
  {
    name = "unknown-sections-detected";
    actual = s.unknownSections s.applianceSections {
      appliance.id = "x";
      tailscale = { };
      bogus = { };
    };
    expected = [ "bogus" ];
  }
  {
    name = "relay-sections-known";
    actual = s.unknownSections s.relaySections {
      http = { };
      rate_limit = { };
    };
    expected = [ ];
  }
  {
    name = "env-names";
    actual = [
      (s.envName s.applianceEnvPrefix "broker" "url")
      (s.envName s.relayEnvPrefix "rate_limit" "per_ip_per_minute")
    ];
    expected = [
      "COMATCHING_APPLIANCE__BROKER__URL"
      "COMATCHING_RELAY__RATE_LIMIT__PER_IP_PER_MINUTE"
    ];
  }
  # Every section the modules let through must exist in the binary (else it refuses to start).
  # The other direction (a new section in Rust not yet listed here) only costs a warning at
  # evaluation, so it is not checked: sections get added while the code is being written.
  {
    name = "drift:relay-sections-exist-in-rust";
    actual = missingIn (configFields (source "cloud-relay/src/config.rs")) s.relaySections;
    expected = [ ];
  }
  {
    name = "drift:appliance-sections-exist-in-rust";
    actual = missingIn (configFields (source "appliance/src/node/config.rs")) s.applianceSections;
    expected = [ ];
  }
  {
    name = "drift:parser-finds-the-core-sections";
    actual = map (f: missingIn (configFields (source f)) [
      "http"
      "storage"
      "broker"
    ]) [
      "cloud-relay/src/config.rs"
      "appliance/src/node/config.rs"
    ];
    expected = [
      [ ]
      [ ]
    ];
  }
  {
    name = "appliance-config-renders-and-parses";
    actual = builtins.fromTOML (render {
      appliance.id = "edge-1";
      http.listen = "0.0.0.0:8081";
      storage = {
        data_dir = "/var/lib/comatching-appliance";
        backend = "sqlite";
      };
      broker.url = "amqp://appliance-edge-1@relay:5672/%2f";
      tailscale = {
        cli = "/nix/store/x-tailscale/bin/tailscale";
        timeout_ms = 2000;
      };
    });
    expected = {
      appliance.id = "edge-1";
      http.listen = "0.0.0.0:8081";
      storage = {
        data_dir = "/var/lib/comatching-appliance";
        backend = "sqlite";
      };
      broker.url = "amqp://appliance-edge-1@relay:5672/%2f";
      tailscale = {
        cli = "/nix/store/x-tailscale/bin/tailscale";
        timeout_ms = 2000;
      };
    };
  }
]
