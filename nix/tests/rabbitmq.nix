# Evaluation tests for nix/lib/rabbitmq.nix: exact topology, permission regexes exercised with
# builtins.match (POSIX ERE, like RabbitMQ's anchored regexes here), refusal of bad input, the
# golden JSON, the listener/TLS config items, and drift checks against the names the Rust code
# declares.
let
  rmq = import ../lib/rabbitmq.nix;
  defs = rmq.definitions {
    appliances = [
      "edge-1"
      "box-2"
    ];
  };
  perms = user: builtins.head (builtins.filter (p: p.user == user) defs.permissions);
  queue = name: builtins.head (builtins.filter (q: q.name == name) defs.queues);
  allows = regex: name: builtins.match regex name != null;
  fails = x: !(builtins.tryEval (builtins.deepSeq x true)).success;

  tlsFiles = {
    cacertfile = "/run/credentials/rabbitmq.service/comatching-ca.pem";
    certfile = "/run/credentials/rabbitmq.service/comatching-broker.pem";
    keyfile = "/run/credentials/rabbitmq.service/comatching-broker.key";
  };

  relay = perms "relay";
  edge = perms "appliance-edge-1";

  # Drift checks: the constants in the Rust sources must equal the generator's.
  source = path: builtins.readFile (../.. + "/${path}");
  topology = source "protocol/src/topology.rs";
  applianceConfig = source "appliance/src/node/config.rs";
  rustConst =
    src: name:
    let
      m = builtins.match ".*const ${name}: [&a-z0-9]+ = \"?([^\";]*)\"?;.*" src;
    in
    if m == null then "<${name} not found>" else builtins.head m;
  brokerScript = source "scripts/broker.sh";
  hasConfLine =
    key: value:
    builtins.match ".*\n${builtins.replaceStrings [ "." ] [ "\\." ] key} = ${value}\n.*" brokerScript
    != null;
  syncDefaultLimit =
    let
      m = builtins.match ".*delivery_limit: ([0-9]+),.*" applianceConfig;
    in
    if m == null then "<Sync::default delivery_limit not found>" else builtins.head m;
in
import ./harness.nix [
  {
    name = "users";
    actual = map (u: u.name) defs.users;
    expected = [
      "relay"
      "appliance-edge-1"
      "appliance-box-2"
    ];
  }
  {
    name = "no-guest-and-no-passwords-in-the-store";
    actual = map (u: u.password_hash) defs.users;
    expected = [
      ""
      ""
      ""
    ];
  }
  {
    name = "password-hash-when-given";
    actual =
      (builtins.head
        (rmq.definitions {
          appliances = [ ];
          passwordHashes.relay = "HASH";
        }).users
      ).password_hash;
    expected = "HASH";
  }
  {
    name = "exchanges";
    actual = map (x: {
      inherit (x)
        name
        type
        durable
        auto_delete
        internal
        ;
    }) defs.exchanges;
    expected = [
      {
        name = "comatching.sync";
        type = "fanout";
        durable = true;
        auto_delete = false;
        internal = false;
      }
      {
        name = "comatching.dead";
        type = "fanout";
        durable = true;
        auto_delete = false;
        internal = false;
      }
    ];
  }
  {
    name = "queue-names";
    actual = map (q: q.name) defs.queues;
    expected = [
      "comatching.dead"
      "comatching.dead.tally"
      "comatching.match.transient"
      "comatching.control"
      "comatching.sync.edge-1"
      "comatching.sync.box-2"
    ];
  }
  {
    name = "all-queues-durable-but-the-match-queue";
    actual = map (q: q.durable && !q.auto_delete && q.vhost == "/") defs.queues;
    expected = [
      true
      true
      false
      true
      true
      true
    ];
  }
  {
    name = "dead-letter-queues-are-bounded";
    actual = map (n: (queue n).arguments) [
      "comatching.dead"
      "comatching.dead.tally"
    ];
    expected =
      let
        bounded = {
          "x-queue-type" = "classic";
          "x-max-length" = 10000;
          "x-overflow" = "drop-head";
          "x-message-ttl" = 86400000;
        };
      in
      [
        bounded
        bounded
      ];
  }
  {
    name = "bounds-configurable";
    actual =
      let
        d = rmq.definitions {
          appliances = [ "a" ];
          syncQueueExpiresH = 2;
          deadLetterMaxLength = 7;
          deadLetterTtlH = 1;
        };
        q = n: (builtins.head (builtins.filter (x: x.name == n) d.queues)).arguments;
      in
      [
        (q "comatching.sync.a")."x-expires"
        (q "comatching.dead")."x-max-length"
        (q "comatching.dead")."x-message-ttl"
      ];
    expected = [
      7200000
      7
      3600000
    ];
  }
  {
    name = "rejects-bad-bounds";
    actual = map fails [
      (rmq.definitions {
        appliances = [ "a" ];
        syncQueueExpiresH = 0;
      })
      (rmq.definitions {
        appliances = [ "a" ];
        deadLetterMaxLength = -1;
      })
    ];
    expected = [
      true
      true
    ];
  }
  {
    # scripts/broker.sh (the test and development node) and the NixOS broker use the same
    # small-box limits.
    name = "drift:small-box-config-items-in-broker-sh";
    actual = builtins.filter (k: !(hasConfLine k rmq.smallBoxConfigItems.${k})) (
      builtins.attrNames rmq.smallBoxConfigItems
    );
    expected = [ ];
  }
  {
    name = "small-box-config-items";
    actual = rmq.smallBoxConfigItems;
    expected = {
      "raft.wal_max_size_bytes" = "67108864";
      "vm_memory_high_watermark.absolute" = "314572800";
    };
  }
  {
    name = "match-queue-arguments";
    actual = (queue "comatching.match.transient").arguments;
    expected = {
      "x-queue-type" = "classic";
      "x-message-ttl" = 120000;
      "x-dead-letter-exchange" = "comatching.dead";
    };
  }
  {
    name = "control-queue-arguments";
    actual = (queue "comatching.control").arguments;
    expected = {
      "x-queue-type" = "quorum";
      "x-delivery-limit" = 5;
      "x-dead-letter-exchange" = "comatching.dead";
    };
  }
  {
    name = "sync-queue-arguments";
    actual = (queue "comatching.sync.edge-1").arguments;
    expected = {
      "x-queue-type" = "quorum";
      "x-single-active-consumer" = true;
      "x-delivery-limit" = 5;
      "x-dead-letter-exchange" = "comatching.dead";
      "x-expires" = 259200000;
    };
  }
  {
    name = "delivery-limits-configurable";
    actual =
      let
        d = rmq.definitions {
          appliances = [ "a" ];
          deliveryLimit = 7;
          syncDeliveryLimit = 9;
        };
      in
      map (q: q.arguments."x-delivery-limit" or null) d.queues;
    expected = [
      null
      null
      null
      7
      9
    ];
  }
  {
    name = "bindings";
    actual = map (b: "${b.source}->${b.destination}") defs.bindings;
    expected = [
      "comatching.dead->comatching.dead"
      "comatching.dead->comatching.dead.tally"
      "comatching.sync->comatching.sync.edge-1"
      "comatching.sync->comatching.sync.box-2"
    ];
  }
  {
    name = "vhost-configurable";
    actual =
      let
        d = rmq.definitions {
          appliances = [ "a" ];
          vhost = "festival";
        };
      in
      builtins.all (x: x.vhost == "festival") (d.queues ++ d.exchanges ++ d.bindings ++ d.permissions)
      && d.vhosts == [ { name = "festival"; } ];
    expected = true;
  }
  {
    # … and delete a retired appliance's sync queue (admin retire-appliance).
    name = "relay-may-declare-the-shared-topology-and-retire-sync-queues";
    actual = map (allows relay.configure) [
      "comatching.sync"
      "comatching.dead"
      "comatching.match.transient"
      "comatching.control"
      "comatching.match"
      "comatching.match.requests"
      "comatching.dead.tally"
      "comatching.sync.edge-1"
      "comatchingXsync"
      "amq.default"
      "comatching.sync.Bad"
      "comatching.sync.a.b"
    ];
    expected = [
      true
      true
      true
      true
      true
      true
      true
      true
      false
      false
      false
      false
    ];
  }
  {
    name = "relay-publishes-to-sync-and-default-exchange";
    actual = map (allows relay.write) [
      "comatching.sync"
      "amq.default"
      "comatching.dead"
      "comatching.match.transient"
      "amq.direct"
    ];
    expected = [
      true
      true
      true
      false
      false
    ];
  }
  {
    name = "relay-reads-control-and-replies";
    actual = map (allows relay.read) [
      "comatching.control"
      "amq.rabbitmq.reply-to"
      "comatching.dead"
      "comatching.dead.tally"
      "comatching.match.transient"
      "comatching.sync.edge-1"
    ];
    expected = [
      true
      true
      true
      true
      false
      false
    ];
  }
  {
    name = "appliance-configures-its-own-queue-not-others";
    actual = map (allows edge.configure) [
      "comatching.sync.edge-1"
      "comatching.sync.box-2"
      "comatching.sync.edge-10"
      "comatching.match.transient"
      "comatching.match"
    ];
    expected = [
      true
      false
      false
      true
      false
    ];
  }
  {
    name = "appliance-writes";
    actual = map (allows edge.write) [
      "amq.default"
      "comatching.sync.edge-1"
      "comatching.dead"
      "comatching.sync"
      "comatching.sync.box-2"
      "comatching.control"
    ];
    expected = [
      true
      true
      true
      false
      false
      false
    ];
  }
  {
    name = "appliance-reads";
    actual = map (allows edge.read) [
      "comatching.match.transient"
      "comatching.sync.edge-1"
      "comatching.sync"
      "comatching.sync.box-2"
      "comatching.control"
    ];
    expected = [
      true
      true
      true
      false
      false
    ];
  }
  {
    name = "rejects-bad-ids";
    actual = map (id: fails (rmq.definitions { appliances = [ id ]; })) [
      "ok-1"
      "-x"
      "Upper"
      "a.b"
      "a|b"
      ""
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
    name = "rejects-duplicate-ids";
    actual = fails (
      rmq.definitions {
        appliances = [
          "a"
          "a"
        ];
      }
    );
    expected = true;
  }
  {
    name = "rejects-bad-limits";
    actual = fails (
      rmq.definitions {
        appliances = [ "a" ];
        deliveryLimit = 0;
      }
    );
    expected = true;
  }
  {
    # The document RabbitMQ reads, for review; regenerate it when the topology changes on purpose.
    name = "golden-json";
    actual = defs;
    expected = builtins.fromJSON (builtins.readFile ./golden/definitions.json);
  }
  {
    name = "split-topology-has-no-users";
    actual = builtins.attrNames (rmq.split { appliances = [ "edge-1" ]; }).topology;
    expected = [
      "bindings"
      "exchanges"
      "global_parameters"
      "parameters"
      "policies"
      "queues"
      "vhosts"
    ];
  }
  {
    name = "split-permissions-per-user";
    actual =
      let
        p = (rmq.split { appliances = [ "edge-1" ]; }).permissions;
      in
      {
        users = builtins.attrNames p;
        edge = p."appliance-edge-1";
      };
    expected = {
      users = [
        "appliance-edge-1"
        "relay"
      ];
      edge = [ edge ];
    };
  }
  {
    name = "listeners-plain-loopback-only";
    actual = rmq.listeners { };
    expected = {
      configItems."listeners.tcp.1" = "127.0.0.1:5672";
      tailnetPort = null;
    };
  }
  {
    name = "listeners-plain-with-tailnet";
    actual = rmq.listeners {
      port = 5672;
      tailnetAddress = "100.90.1.2";
    };
    expected = {
      configItems = {
        "listeners.tcp.1" = "127.0.0.1:5672";
        "listeners.tcp.2" = "100.90.1.2:5672";
      };
      tailnetPort = 5672;
    };
  }
  {
    # The settings the integration tests run RabbitMQ 3.10 with, on both addresses.
    name = "listeners-tls-only";
    actual = rmq.listeners {
      tailnetAddress = "100.90.1.2";
      tls = tlsFiles;
    };
    expected = {
      configItems = {
        "listeners.tcp" = "none";
        "listeners.ssl.1" = "127.0.0.1:5671";
        "listeners.ssl.2" = "100.90.1.2:5671";
        "ssl_options.cacertfile" = "/run/credentials/rabbitmq.service/comatching-ca.pem";
        "ssl_options.certfile" = "/run/credentials/rabbitmq.service/comatching-broker.pem";
        "ssl_options.keyfile" = "/run/credentials/rabbitmq.service/comatching-broker.key";
        "ssl_options.verify" = "verify_peer";
        "ssl_options.fail_if_no_peer_cert" = "true";
      };
      tailnetPort = 5671;
    };
  }
  {
    name = "listeners-tls-keeps-plain-on-loopback-only";
    actual =
      let
        l = rmq.listeners {
          tailnetAddress = "100.90.1.2";
          tls = tlsFiles // {
            plainLoopback = true;
            port = 5700;
          };
        };
      in
      {
        plain = builtins.filter (k: builtins.match "listeners\\.tcp.*" k != null) (
          builtins.attrNames l.configItems
        );
        tcp1 = l.configItems."listeners.tcp.1";
        ssl = [
          l.configItems."listeners.ssl.1"
          l.configItems."listeners.ssl.2"
        ];
        inherit (l) tailnetPort;
      };
    expected = {
      plain = [ "listeners.tcp.1" ];
      tcp1 = "127.0.0.1:5672";
      ssl = [
        "127.0.0.1:5700"
        "100.90.1.2:5700"
      ];
      tailnetPort = 5700;
    };
  }
  {
    name = "listeners-refuse-missing-files-and-bad-ports";
    actual = map fails [
      (rmq.listeners { tls = removeAttrs tlsFiles [ "keyfile" ]; })
      (rmq.listeners { tls = tlsFiles // { certfile = ""; }; })
      (rmq.listeners { port = 0; })
      (rmq.listeners { tls = tlsFiles // { port = 70000; }; })
      (rmq.listeners { tls = tlsFiles; })
    ];
    expected = [
      true
      true
      true
      true
      false
    ];
  }
  {
    name = "drift:names";
    actual = map (rustConst topology) [
      "SYNC_EXCHANGE"
      "MATCH_QUEUE"
      "LEGACY_MATCH_QUEUE"
      "DURABLE_MATCH_QUEUE"
      "DEAD_EXCHANGE"
      "DEAD_QUEUE"
      "DEAD_TALLY_QUEUE"
      "CONTROL_QUEUE"
      "CONTROL_DELIVERY_LIMIT"
      "MATCH_QUEUE_TTL_MS"
      "DEAD_LETTERS_MAX_LENGTH"
      "DEAD_LETTERS_TTL_H"
      "SYNC_QUEUE_EXPIRES_H"
    ];
    expected = with rmq.names; [
      syncExchange
      matchQueue
      legacyMatchQueue
      durableMatchQueue
      deadExchange
      deadQueue
      deadTallyQueue
      controlQueue
      "5"
      (toString matchQueueTtlMs)
      (toString defaultDeadLetterMaxLength)
      (toString defaultDeadLetterTtlH)
      (toString defaultSyncQueueExpiresH)
    ];
  }
  {
    name = "drift:appliance-sync-delivery-limit-default";
    actual = syncDefaultLimit;
    expected = "5";
  }
]
