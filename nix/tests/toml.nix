# Evaluation tests for nix/lib/toml.nix.
let
  inherit (import ../lib/toml.nix) render;
  fails = x: !(builtins.tryEval (builtins.deepSeq (render x) true)).success;
  # Round trip through Nix's own TOML parser (values without nulls, paths or derivations).
  roundTrips = x: builtins.fromTOML (render x) == x;
in
import ./harness.nix [
  {
    name = "relay-config-exact";
    actual = render {
      http = {
        listen = "127.0.0.1:8080";
        max_body_bytes = 65536;
      };
      storage.data_dir = "/var/lib/comatching-relay";
      broker = {
        url = "amqp://relay@127.0.0.1:5672/%2f";
        heartbeat_s = 10;
      };
    };
    expected = ''
      [broker]
      heartbeat_s = 10
      url = "amqp://relay@127.0.0.1:5672/%2f"

      [http]
      listen = "127.0.0.1:8080"
      max_body_bytes = 65536

      [storage]
      data_dir = "/var/lib/comatching-relay"
    '';
  }
  {
    name = "top-level-keys-before-tables";
    actual = render {
      z = 1;
      a.b = true;
    };
    expected = "z = 1\n\n[a]\nb = true\n";
  }
  {
    name = "nulls-are-omitted";
    actual = render {
      keep = 1;
      drop = null;
      t = {
        gone = null;
        here = "x";
      };
      l = [
        1
        null
        2
      ];
    };
    expected = "keep = 1\nl = [1, 2]\n\n[t]\nhere = \"x\"\n";
  }
  {
    name = "string-escapes";
    actual = render { s = "quote\" back\\ nl\n tab\t"; };
    expected = ''s = "quote\" back\\ nl\n tab\t"'' + "\n";
  }
  {
    name = "floats-keep-a-point";
    actual = render {
      a = 1.0;
      b = 0.25;
      c = -2.0;
    };
    expected = "a = 1.0\nb = 0.25\nc = -2.0\n";
  }
  {
    name = "quoted-keys";
    actual = render {
      "has space" = 1;
      "dotted.key".x = 2;
    };
    expected = "\"has space\" = 1\n\n[\"dotted.key\"]\nx = 2\n";
  }
  {
    name = "nested-tables-without-empty-parents";
    actual = render { a.b.c = 1; };
    expected = "[a.b]\nc = 1\n";
  }
  {
    name = "empty-table-keeps-its-header";
    actual = render { a = { }; };
    expected = "[a]\n";
  }
  {
    name = "inline-tables-in-arrays";
    actual = render {
      l = [
        { x = 1; }
        { }
      ];
    };
    expected = "l = [{ x = 1 }, {}]\n";
  }
  {
    name = "derivation-like-renders-as-path";
    actual = render {
      tailscale.cli = {
        outPath = "/nix/store/aaaa-tailscale";
        type = "derivation";
      };
    };
    expected = "[tailscale]\ncli = \"/nix/store/aaaa-tailscale\"\n";
  }
  {
    name = "empty-settings";
    actual = render { };
    expected = "";
  }
  {
    name = "round-trip-appliance-like";
    actual = roundTrips {
      appliance.id = "edge-1";
      http.listen = "0.0.0.0:8081";
      storage = {
        data_dir = "/var/lib/comatching-appliance";
        backend = "sqlite";
      };
      sync = {
        batch_max = 1000;
        delivery_limit = 5;
      };
      tailscale = {
        cli = "/run/current-system/sw/bin/tailscale";
        timeout_ms = 2000;
      };
      points.important = [
        "age"
        "major"
      ];
      weights = [
        0.5
        1.5
      ];
      nested = [
        [ 1 ]
        [
          2
          3
        ]
      ];
    };
    expected = true;
  }
  {
    name = "round-trip-awkward-strings";
    actual = roundTrips {
      s = "a\"b\\c\nd\te ü 한글 ${"$"}{x}";
      "k y" = "v";
    };
    expected = true;
  }
  {
    name = "refuses-functions";
    actual = fails { f = x: x; };
    expected = true;
  }
  {
    name = "refuses-non-attrs";
    actual = fails [ 1 ];
    expected = true;
  }
]
