# Evaluation tests for nix/lib/tls.nix: credential paths and LoadCredential= lines (certificates
# and the link key), the TOML keys they render to, the AMQP URL, the [broker]/[http] rules, and
# drift checks against the Rust sources (the keys must exist there: both binaries refuse unknown
# fields).
let
  tls = import ../lib/tls.nix;
  inherit (import ../lib/toml.nix) render;
  fails = x: !(builtins.tryEval (builtins.deepSeq x true)).success;

  relayUnit = "comatching-relay";
  applianceUnit = "comatching-appliance";

  https = tls.httpsServer {
    unit = relayUnit;
    what = "services.comatching-relay.https";
    certFile = "/var/lib/acme/api.example.org/fullchain.pem";
    keyFile = "/var/lib/acme/api.example.org/key.pem";
  };
  client = tls.brokerClient {
    unit = applianceUnit;
    what = "services.comatching-appliance.brokerClient";
    caFile = "/var/lib/comatching-provision/broker-ca.pem";
    certFile = "/var/lib/comatching-provision/broker-client.pem";
    keyFile = "/var/lib/comatching-provision/broker-client.key";
  };
  none = tls.brokerClient {
    unit = applianceUnit;
    what = "x";
  };
  link = tls.linkKey {
    unit = applianceUnit;
    what = "services.comatching-appliance";
    file = "/var/lib/comatching-provision/link.key";
  };
  noLink = tls.linkKey {
    unit = relayUnit;
    what = "services.comatching-relay";
  };
  # Every credential helper with every file set, per unit, as the modules combine them.
  relayAll = [
    https
    (tls.brokerClient {
      unit = relayUnit;
      what = "x";
      caFile = "/a";
      certFile = "/b";
      keyFile = "/c";
    })
    (tls.linkKey {
      unit = relayUnit;
      what = "x";
      file = "/d";
    })
  ];
  applianceAll = [
    client
    link
  ];
  ids =
    creds:
    map (l: builtins.head (builtins.split ":" l)) (builtins.concatMap (c: c.loadCredential) creds);
  duplicates = xs: builtins.filter (x: builtins.length (builtins.filter (y: y == x) xs) > 1) xs;

  # Field names of `pub struct NAME { pub a: A, ... }` in a Rust source.
  source = path: builtins.readFile (../.. + "/${path}");
  structFields =
    name: src:
    let
      m = builtins.match ".*pub struct ${name} \\{([^}]*)}.*" src;
      body = if m == null then "" else builtins.head m;
    in
    builtins.concatMap (p: if builtins.isList p then p else [ ]) (builtins.split "pub ([a-z_]+):" body);
  missingIn = known: xs: builtins.filter (x: !(builtins.elem x known)) xs;
  protocolConfig = source "protocol/src/config.rs";
  relayConfig = source "cloud-relay/src/config.rs";
  applianceConfig = source "appliance/src/node/config.rs";
  relayPki = source "cloud-relay/src/pki.rs";
  reexportsBrokerSettings =
    src: builtins.match ".*pub use comatching_protocol::config::BrokerSettings as Broker;.*" src != null;
  # The first line of each message, as the Rust source spells it (one message is wrapped there).
  firstLine = m: builtins.head (builtins.split " \\(the broker" m);
  inRust = src: m: builtins.match ".*${builtins.replaceStrings [ "*" "(" ")" "." ] [ "\\*" "\\(" "\\)" "\\." ] (firstLine m)}.*" src != null;
in
import ./harness.nix [
  {
    name = "credential-path";
    actual = [
      (tls.credentialPath "comatching-relay" "https-cert.pem")
      (tls.credentialPath "rabbitmq.service" "comatching-ca.pem")
    ];
    expected = [
      "/run/credentials/comatching-relay.service/https-cert.pem"
      "/run/credentials/rabbitmq.service/comatching-ca.pem"
    ];
  }
  {
    name = "credential-path-refuses-odd-names";
    actual = map (args: fails (tls.credentialPath args.unit args.id)) [
      {
        unit = "u";
        id = "ok_1.pem";
      }
      {
        unit = "u";
        id = "a/b";
      }
      {
        unit = "u";
        id = "a:b";
      }
      {
        unit = "u";
        id = ".hidden";
      }
      {
        unit = "u";
        id = "";
      }
      {
        unit = "a/b";
        id = "x";
      }
    ];
    expected = [
      false
      true
      true
      true
      true
      true
    ];
  }
  {
    name = "https-settings-are-the-credential-paths";
    actual = https.settings;
    expected = {
      tls_cert = "/run/credentials/comatching-relay.service/https-cert.pem";
      tls_key = "/run/credentials/comatching-relay.service/https-key.pem";
    };
  }
  {
    name = "https-load-credential-lines";
    actual = https.loadCredential;
    expected = [
      "https-cert.pem:/var/lib/acme/api.example.org/fullchain.pem"
      "https-key.pem:/var/lib/acme/api.example.org/key.pem"
    ];
  }
  {
    name = "broker-client-settings-and-credentials";
    actual = {
      inherit (client) settings loadCredential errors;
    };
    expected = {
      settings = {
        tls_ca = "/run/credentials/comatching-appliance.service/broker-ca.pem";
        tls_cert = "/run/credentials/comatching-appliance.service/broker-cert.pem";
        tls_key = "/run/credentials/comatching-appliance.service/broker-key.pem";
      };
      loadCredential = [
        "broker-ca.pem:/var/lib/comatching-provision/broker-ca.pem"
        "broker-cert.pem:/var/lib/comatching-provision/broker-client.pem"
        "broker-key.pem:/var/lib/comatching-provision/broker-client.key"
      ];
      errors = [ ];
    };
  }
  {
    name = "nothing-configured-renders-nothing";
    actual = {
      inherit (none) loadCredential errors;
      toml = render { broker = none.settings // { url = "amqp://a@h:5672/%2f"; }; };
    };
    expected = {
      loadCredential = [ ];
      errors = [ ];
      toml = "[broker]\nurl = \"amqp://a@h:5672/%2f\"\n";
    };
  }
  {
    name = "ca-only-is-allowed";
    actual =
      let
        c = tls.brokerClient {
          unit = "u";
          what = "x";
          caFile = "/etc/ca.pem";
        };
      in
      {
        inherit (c) settings loadCredential;
      };
    expected = {
      settings = {
        tls_ca = "/run/credentials/u.service/broker-ca.pem";
        tls_cert = null;
        tls_key = null;
      };
      loadCredential = [ "broker-ca.pem:/etc/ca.pem" ];
    };
  }
  {
    name = "sources-must-be-absolute-and-outside-the-store";
    actual =
      (tls.brokerClient {
        unit = "u";
        what = "opt";
        caFile = "/nix/store/aaaa-ca.pem";
        certFile = "relative.pem";
        keyFile = "/root/ok.key";
      }).errors;
    expected = [
      "opt.caFile is in the Nix store (/nix/store/aaaa-ca.pem), which every local user can read; keep certificates and keys outside it"
      "opt.certFile must be an absolute path (a string, not a Nix path: it must not be copied into the store), got \"relative.pem\""
    ];
  }
  {
    name = "rendered-toml-parses";
    actual = builtins.fromTOML (render {
      http = {
        listen = "0.0.0.0:443";
      }
      // https.settings;
      broker = {
        url = "amqps://relay@127.0.0.1:5671/%2f";
      }
      // client.settings;
    });
    expected = {
      http = {
        listen = "0.0.0.0:443";
        tls_cert = "/run/credentials/comatching-relay.service/https-cert.pem";
        tls_key = "/run/credentials/comatching-relay.service/https-key.pem";
      };
      broker = {
        url = "amqps://relay@127.0.0.1:5671/%2f";
        tls_ca = "/run/credentials/comatching-appliance.service/broker-ca.pem";
        tls_cert = "/run/credentials/comatching-appliance.service/broker-cert.pem";
        tls_key = "/run/credentials/comatching-appliance.service/broker-key.pem";
      };
    };
  }
  {
    name = "cli-exports-point-at-the-wrappers-own-credentials";
    actual = tls.cliExports "COMATCHING_APPLIANCE" "broker" client;
    expected = ''
      export COMATCHING_APPLIANCE__BROKER__TLS_CA="$CREDENTIALS_DIRECTORY/broker-ca.pem"
      export COMATCHING_APPLIANCE__BROKER__TLS_CERT="$CREDENTIALS_DIRECTORY/broker-cert.pem"
      export COMATCHING_APPLIANCE__BROKER__TLS_KEY="$CREDENTIALS_DIRECTORY/broker-key.pem"
    '';
  }
  {
    name = "cli-exports-empty-without-files";
    actual = tls.cliExports "COMATCHING_APPLIANCE" "broker" none;
    expected = "";
  }
  {
    name = "link-key-setting-and-credential";
    actual = {
      inherit (link) settings loadCredential errors;
    };
    expected = {
      settings.link_key_file = "/run/credentials/comatching-appliance.service/link.key";
      loadCredential = [ "link.key:/var/lib/comatching-provision/link.key" ];
      errors = [ ];
    };
  }
  {
    name = "link-key-unset-renders-nothing";
    actual = {
      inherit (noLink) loadCredential errors;
      toml = render { broker = noLink.settings // { url = "amqp://a@h:5672/%2f"; }; };
    };
    expected = {
      loadCredential = [ ];
      errors = [ ];
      toml = "[broker]\nurl = \"amqp://a@h:5672/%2f\"\n";
    };
  }
  {
    name = "link-key-source-must-be-absolute-and-outside-the-store";
    actual =
      map
        (
          file:
          (tls.linkKey {
            unit = relayUnit;
            what = "services.comatching-relay";
            inherit file;
          }).errors
        )
        [
          "/nix/store/aaaa-link.key"
          "link.key"
          "/var/lib/comatching-secrets/link.key"
        ];
    expected = [
      [
        "services.comatching-relay.linkKeyFile is in the Nix store (/nix/store/aaaa-link.key), which every local user can read; keep certificates and keys outside it"
      ]
      [
        "services.comatching-relay.linkKeyFile must be an absolute path (a string, not a Nix path: it must not be copied into the store), got \"link.key\""
      ]
      [ ]
    ];
  }
  {
    name = "link-key-with-tls-renders-one-broker-section";
    actual = builtins.fromTOML (render {
      broker = {
        url = "amqps://appliance-edge-1@comatching-relay:5671/%2f";
      }
      // client.settings
      // link.settings;
    });
    expected.broker = {
      url = "amqps://appliance-edge-1@comatching-relay:5671/%2f";
      tls_ca = "/run/credentials/comatching-appliance.service/broker-ca.pem";
      tls_cert = "/run/credentials/comatching-appliance.service/broker-cert.pem";
      tls_key = "/run/credentials/comatching-appliance.service/broker-key.pem";
      link_key_file = "/run/credentials/comatching-appliance.service/link.key";
    };
  }
  # The link key has no rule of its own in BrokerSettings::check: with or without TLS it adds
  # no error (and a plain amqp:// URL with a key is fine).
  {
    name = "link-key-adds-no-broker-rule";
    actual = map tls.brokerErrors [
      ({ url = "amqp://a@h:5672/%2f"; } // link.settings)
      ({ url = "amqps://a@h:5671/%2f"; } // client.settings // link.settings)
    ];
    expected = [
      [ ]
      [ ]
    ];
  }
  {
    name = "cli-exports-link-key";
    actual = tls.cliExports "COMATCHING_APPLIANCE" "broker" link;
    expected = ''
      export COMATCHING_APPLIANCE__BROKER__LINK_KEY_FILE="$CREDENTIALS_DIRECTORY/link.key"
    '';
  }
  {
    name = "cli-exports-empty-without-link-key";
    actual = tls.cliExports "COMATCHING_RELAY" "broker" noLink;
    expected = "";
  }
  # One unit's LoadCredential= lines come from several helpers; two with one id would make the
  # second file replace the first under the same name.
  {
    name = "credential-ids-distinct-per-unit";
    actual = {
      relay = ids relayAll;
      relayDuplicates = duplicates (ids relayAll);
      applianceDuplicates = duplicates (ids applianceAll);
    };
    expected = {
      relay = [
        "https-cert.pem"
        "https-key.pem"
        "broker-ca.pem"
        "broker-cert.pem"
        "broker-key.pem"
        "link.key"
      ];
      relayDuplicates = [ ];
      applianceDuplicates = [ ];
    };
  }
  {
    name = "amqp-urls";
    actual = [
      (tls.amqpUrl {
        user = "appliance-edge-1";
        host = "comatching-relay";
        tls = true;
      })
      (tls.amqpUrl {
        user = "appliance-edge-1";
        host = "comatching-relay";
      })
      (tls.amqpUrl {
        user = "relay";
        host = "127.0.0.1";
        tls = true;
        port = 5700;
        vhost = "festival/2026";
      })
    ];
    expected = [
      "amqps://appliance-edge-1@comatching-relay:5671/%2f"
      "amqp://appliance-edge-1@comatching-relay:5672/%2f"
      "amqps://relay@127.0.0.1:5700/festival%2f2026"
    ];
  }
  {
    name = "broker-rules-accept-coherent-settings";
    actual = map tls.brokerErrors [
      { url = "amqp://a@h:5672/%2f"; }
      {
        url = "amqp://a@h:5672/%2f";
        tls_ca = null;
        tls_cert = null;
        tls_key = null;
      }
      ({ url = "amqps://a@h:5671/%2f"; } // client.settings)
      {
        url = "amqps://a@h:5671/%2f";
        tls_ca = "/ca.pem";
      }
    ];
    expected = [
      [ ]
      [ ]
      [ ]
      [ ]
    ];
  }
  {
    name = "broker-rules-refuse-what-the-binaries-refuse";
    actual = map tls.brokerErrors [
      { url = "http://a@h/"; }
      { url = "amqps://a@h:5671/%2f"; }
      ({ url = "amqp://a@h:5672/%2f"; } // client.settings)
      {
        url = "amqps://a@h:5671/%2f";
        tls_ca = "/ca.pem";
        tls_cert = "/c.pem";
      }
    ];
    expected = [
      [ "broker.url must start with amqp:// or amqps://" ]
      [
        "broker.url is amqps:// but broker.tls_ca is not set (the broker's certificate is checked against that CA only)"
      ]
      [ "broker.tls_* is set but broker.url is not amqps://" ]
      [ "broker.tls_cert and broker.tls_key go together: set both or neither" ]
    ];
  }
  {
    name = "http-rules";
    actual = map tls.httpErrors [
      { listen = "127.0.0.1:8080"; }
      https.settings
      { tls_key = "/k"; }
    ];
    expected = [
      [ ]
      [ ]
      [ "http.tls_cert and http.tls_key go together: set both or neither" ]
    ];
  }
  # The TOML keys rendered here must exist in the binaries (deny_unknown_fields) ...
  {
    name = "drift:broker-tls-keys-exist-in-rust";
    actual = missingIn (structFields "BrokerSettings" protocolConfig) (builtins.attrNames client.settings);
    expected = [ ];
  }
  {
    name = "drift:broker-link-key-exists-in-rust";
    actual = missingIn (structFields "BrokerSettings" protocolConfig) (builtins.attrNames link.settings);
    expected = [ ];
  }
  # BrokerSettings is the [broker] of both binaries (re-exported as their `Broker`), which is what
  # lets one check above stand for the relay and the appliance.
  {
    name = "drift:both-binaries-broker-section-is-BrokerSettings";
    actual = map reexportsBrokerSettings [
      relayConfig
      applianceConfig
    ];
    expected = [
      true
      true
    ];
  }
  # `pki link-key` writes <dir>/link.key; the runbook copies "$P/link.key" under that name.
  {
    name = "drift:pki-link-key-writes-link.key";
    actual = builtins.match ".*pub const LINK_KEY: &str = \"link\\.key\";.*" relayPki != null;
    expected = true;
  }
  {
    name = "drift:http-tls-keys-exist-in-rust";
    actual = missingIn (structFields "Http" relayConfig) (builtins.attrNames https.settings);
    expected = [ ];
  }
  {
    name = "drift:field-parser-finds-url";
    actual = builtins.elem "url" (structFields "BrokerSettings" protocolConfig);
    expected = true;
  }
  # ... and the rules mirrored here must still be the binaries' rules.
  {
    name = "drift:broker-rules-are-the-rust-rules";
    actual = builtins.filter (m: !(inRust protocolConfig m)) (
      builtins.concatMap tls.brokerErrors [
        { url = "x"; }
        { url = "amqps://h"; }
        {
          url = "amqp://h";
          tls_ca = "/c";
          tls_cert = "/c";
        }
      ]
    );
    expected = [ ];
  }
  {
    name = "drift:http-rule-is-the-rust-rule";
    actual = builtins.filter (m: !(inRust relayConfig m)) (tls.httpErrors { tls_cert = "/c"; });
    expected = [ ];
  }
]
