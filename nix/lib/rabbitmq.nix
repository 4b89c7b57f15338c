# The broker topology of COMATCHING Edge as a RabbitMQ definitions document (the JSON read by
# `definitions.local.path` at node boot and by `rabbitmqctl import_definitions`), with builtins
# only so it evaluates and is tested offline (nix/tests/rabbitmq.nix).
#
# It must stay equivalent to what the binaries declare themselves (protocol/src/topology.rs and
# comatching_protocol::amqp::declare_shared_topology; the appliance's own sync queue in
# appliance/src/node/link.rs): RabbitMQ refuses a redeclare with different arguments.
#
#   comatching.sync             fanout exchange, durable            relay → every appliance
#   comatching.sync.<id>        quorum queue per appliance, bound   single active consumer
#   comatching.match.transient  classic queue, non-durable, TTL cap relay → any appliance (RPC)
#   comatching.control          quorum queue                        appliance hellos → relay
#   comatching.dead             fanout exchange + durable queue     dead letters of all the above
#                               (bounded: x-max-length drop-head + x-message-ttl)
#   comatching.dead.tally       classic queue bound to comatching.dead, bounded likewise; the
#                               relay consumes it to count dead letters on /metrics
#
# Sync queues expire (`x-expires`) when unused for `syncQueueExpiresH` hours (the binaries'
# `sync.queue_expires_h`), so an appliance that never returns stops collecting every change.
#
# `comatching.match` (a quorum queue) and `comatching.match.requests` (durable classic) were the
# match queues of earlier releases; a queue's type or durability cannot change in place, so the
# relay deletes them once no consumer is left (it may configure them for that, nothing else).
# The match queue is non-durable so that on a cluster it goes with its node and is declared
# again on a live one (ARCHITECTURE.md, "Broker failover").
#
# Users: `relay`, and `appliance-<id>` per appliance, each with the narrowest permissions the
# code's own declarations allow (see `permissions` below). No `guest`: the definitions cannot
# delete it, so the relay module removes it after import.
let
  inherit (builtins)
    attrNames
    concatStringsSep
    hasAttr
    isInt
    isList
    length
    listToAttrs
    match
    replaceStrings
    toJSON
    ;

  syncExchange = "comatching.sync";
  deadExchange = "comatching.dead";
  deadQueue = "comatching.dead";
  deadTallyQueue = "comatching.dead.tally";
  # protocol/src/topology.rs: DEAD_LETTERS_MAX_LENGTH, DEAD_LETTERS_TTL_H, SYNC_QUEUE_EXPIRES_H.
  defaultDeadLetterMaxLength = 10000;
  defaultDeadLetterTtlH = 24;
  defaultSyncQueueExpiresH = 72;
  hourMs = 3600000;

  # rabbitmq.conf items for a broker that shares a 1 GiB box with the relay (the same items
  # scripts/broker.sh writes; nix/tests/rabbitmq.nix checks they agree). RabbitMQ's defaults
  # are sized for big servers: the quorum-queue WAL is kept in memory up to 512 MiB before it
  # rolls over, and the memory watermark is 40 % of the machine's RAM. Here the WAL rolls over
  # at 64 MiB and publishers are blocked (the relay's outbox waits, matches answer 503 in
  # time) once the node uses 300 MiB. See docs/bench/broker.md.
  smallBoxConfigItems = {
    "raft.wal_max_size_bytes" = "67108864";
    "vm_memory_high_watermark.absolute" = "314572800";
  };
  matchQueue = "comatching.match.transient";
  legacyMatchQueue = "comatching.match";
  durableMatchQueue = "comatching.match.requests";
  controlQueue = "comatching.control";
  # The longest deadline the relay accepts (matching.deadline_ms ≤ 120 s).
  matchQueueTtlMs = 120000;

  # Same rule as comatching_protocol::ApplianceId: 1–64 of a-z, 0-9, '-', not starting with
  # '-'. It also makes the id safe to splice into a permission regex.
  checkId =
    id:
    if match "[a-z0-9][a-z0-9-]{0,63}" id != null then
      id
    else
      throw "rabbitmq: invalid appliance id ${toJSON id} (1-64 of a-z, 0-9, '-', not starting with '-')";

  syncQueue = id: "comatching.sync.${checkId id}";
  applianceUser = id: "appliance-${checkId id}";

  # A regex matching exactly the given names (dots escaped).
  exactly =
    names:
    let
      esc = n: replaceStrings [ "." ] [ "\\." ] n;
    in
    "^(" + concatStringsSep "|" (map esc names) + ")$";

  # Permissions follow RabbitMQ's access-control table:
  #   declare (even of an existing entity) = configure on it; publish = write on the exchange
  #   (the default exchange is `amq.default`); consume = read on the queue; queue.bind = write on
  #   the queue and read on the exchange.
  # Publishing through the default exchange (match requests, snapshot chunks, hellos, RPC
  # replies to direct reply-to) needs write on `amq.default`, which RabbitMQ cannot narrow by
  # routing key.
  relayPermissions = {
    # declares both exchanges, the dead-letter queues, the match and control queues; looks up
    # and deletes the match queues of earlier releases; deletes a retired appliance's sync queue
    # (`comatching-relay admin retire-appliance`)
    configure =
      "^(comatching\\.sync|comatching\\.dead|comatching\\.dead\\.tally|comatching\\.match\\.transient"
      + "|comatching\\.control|comatching\\.match|comatching\\.match\\.requests"
      + "|comatching\\.sync\\.[a-z0-9][a-z0-9-]{0,63})$";
    # publishes events to comatching.sync, everything else through the default exchange; binds
    # both dead-letter queues to comatching.dead (exchange)
    write = exactly [
      "amq.default"
      syncExchange
      deadQueue
      deadTallyQueue
    ];
    # consumes comatching.control, its RPC replies and the dead-letter tally; the dead-letter
    # bindings read the exchange
    read = exactly [
      controlQueue
      deadExchange
      deadTallyQueue
      "amq.rabbitmq.reply-to"
    ];
  };

  appliancePermissions = id: {
    # declares the shared topology (as the relay does) and its own sync queue, nobody else's
    configure = exactly [
      syncExchange
      deadExchange
      matchQueue
      controlQueue
      (syncQueue id)
    ];
    # hellos and match replies go through the default exchange; binds its own queue and the
    # dead-letter queue
    write = exactly [
      "amq.default"
      deadQueue
      (syncQueue id)
    ];
    # consumes its own sync queue and the shared match queue; its bindings read both exchanges
    read = exactly [
      syncExchange
      deadExchange
      matchQueue
      (syncQueue id)
    ];
  };

  checkLimit =
    what: n:
    if isInt n && n > 0 then n else throw "rabbitmq: ${what} must be a positive integer";

  # definitions :: { appliances, vhost?, relayUser?, deliveryLimit?, syncDeliveryLimit?,
  #                  passwordHashes? } -> attrs (serialise with builtins.toJSON)
  #
  # passwordHashes maps user names to RabbitMQ password hashes (base64 of salt ++
  # sha256(salt ++ password)); a user without one gets an empty hash, i.e. cannot log in until
  # `rabbitmqctl change_password` runs (the relay module does that from runtime files).
  definitions =
    {
      appliances,
      vhost ? "/",
      relayUser ? "relay",
      deliveryLimit ? 5,
      syncDeliveryLimit ? 5,
      syncQueueExpiresH ? defaultSyncQueueExpiresH,
      deadLetterMaxLength ? defaultDeadLetterMaxLength,
      deadLetterTtlH ? defaultDeadLetterTtlH,
      passwordHashes ? { },
    }:
    let
      ids =
        if !(isList appliances) then
          throw "rabbitmq: appliances must be a list of ids"
        else if length appliances != length (attrNames (listToAttrs (map (id: {
          name = id;
          value = null;
        }) appliances)))
        then
          throw "rabbitmq: duplicate appliance id"
        else
          map checkId appliances;

      user = name: {
        inherit name;
        password_hash = if hasAttr name passwordHashes then passwordHashes.${name} else "";
        hashing_algorithm = "rabbit_password_hashing_sha256";
        tags = [ ];
        limits = { };
      };

      permission = name: perms: {
        user = name;
        inherit vhost;
        inherit (perms) configure write read;
      };

      exchange = name: {
        inherit name vhost;
        type = "fanout";
        durable = true;
        auto_delete = false;
        internal = false;
        arguments = { };
      };

      queue = name: arguments: {
        inherit name vhost arguments;
        durable = true;
        auto_delete = false;
      };

      transientQueue = name: arguments: queue name arguments // { durable = false; };

      controlArgs = {
        "x-queue-type" = "quorum";
        "x-delivery-limit" = checkLimit "deliveryLimit" deliveryLimit;
        "x-dead-letter-exchange" = deadExchange;
      };

      # Transient requests that are worthless after their deadline: no replicated log.
      matchArgs = {
        "x-queue-type" = "classic";
        "x-message-ttl" = matchQueueTtlMs;
        "x-dead-letter-exchange" = deadExchange;
      };

      # Bounded: the newest dead letters are kept, for a while; they dead-letter nowhere.
      deadArgs = {
        "x-queue-type" = "classic";
        "x-max-length" = checkLimit "deadLetterMaxLength" deadLetterMaxLength;
        "x-overflow" = "drop-head";
        "x-message-ttl" = hourMs * checkLimit "deadLetterTtlH" deadLetterTtlH;
      };

      binding = source: destination: {
        inherit source vhost destination;
        destination_type = "queue";
        routing_key = "";
        arguments = { };
      };
    in
    {
      users = [ (user relayUser) ] ++ map (id: user (applianceUser id)) ids;
      vhosts = [ { name = vhost; } ];
      permissions = [
        (permission relayUser relayPermissions)
      ] ++ map (id: permission (applianceUser id) (appliancePermissions id)) ids;
      exchanges = [
        (exchange syncExchange)
        (exchange deadExchange)
      ];
      queues = [
        (queue deadQueue deadArgs)
        (queue deadTallyQueue deadArgs)
        (transientQueue matchQueue matchArgs)
        (queue controlQueue controlArgs)
      ]
      ++ map (
        id:
        queue (syncQueue id) {
          "x-queue-type" = "quorum";
          "x-single-active-consumer" = true;
          "x-delivery-limit" = checkLimit "syncDeliveryLimit" syncDeliveryLimit;
          "x-dead-letter-exchange" = deadExchange;
          "x-expires" = hourMs * checkLimit "syncQueueExpiresH" syncQueueExpiresH;
        }
      ) ids;
      bindings = [
        (binding deadExchange deadQueue)
        (binding deadExchange deadTallyQueue)
      ]
      ++ map (id: binding syncExchange (syncQueue id)) ids;
      parameters = [ ];
      global_parameters = [ ];
      policies = [ ];
    };
  # The same, split the way the relay module deploys it: `topology` (vhost, exchanges, queues,
  # bindings; imported at every broker boot, no users so no `guest` is seeded either) and
  # `permissions` per user name (imported with the users' runtime password hashes by
  # nix/modules/broker-users.sh).
  split =
    args:
    let
      d = definitions args;
    in
    {
      topology = removeAttrs d [
        "users"
        "permissions"
      ];
      permissions = listToAttrs (
        map (p: {
          name = p.user;
          value = [ p ];
        }) d.permissions
      );
    };

  # The `rabbitmq.conf` items (services.rabbitmq.configItems) for the node's AMQP listeners.
  #
  #   listeners { port ? 5672; tailnetAddress ? null; tls ? null; }
  #     tls = { port ? 5671; cacertfile; certfile; keyfile; plainLoopback ? false; }
  #   -> { configItems = { "key" = "value"; … }; tailnetPort = port to open on the tailnet, or null; }
  #
  # Plain AMQP: 127.0.0.1 and, when given, the tailnet address. TLS: the same addresses on the
  # TLS port, with exactly the settings the integration tests run RabbitMQ 3.10 with (peer
  # verification against our CA, a client certificate required; passwords still apply on top)
  # and `listeners.tcp = none`, unless `plainLoopback` keeps plain AMQP on 127.0.0.1 only (for a
  # relay on the same host that then needs no client certificate). `listeners.tcp = none` wins
  # over the `listeners.tcp.1` that nixpkgs' module always adds: rabbit.schema's translation of
  # rabbit.tcp_listeners returns [] for `none` before it looks at numbered entries (checked in
  # RabbitMQ 3.10.8's rabbit.schema, and on a node, see docs/operations.md).
  listeners =
    {
      port ? 5672,
      tailnetAddress ? null,
      tls ? null,
    }:
    let
      checkPort =
        what: p:
        if isInt p && p > 0 && p < 65536 then p else throw "rabbitmq: ${what} must be a port number";
      addresses = [ "127.0.0.1" ] ++ (if tailnetAddress == null then [ ] else [ tailnetAddress ]);
      numbered =
        prefix: p:
        listToAttrs (
          builtins.genList (i: {
            name = "${prefix}.${toString (i + 1)}";
            value = "${builtins.elemAt addresses i}:${toString p}";
          }) (length addresses)
        );
      plainPort = checkPort "port" port;
      tlsPort = checkPort "tls.port" (tls.port or 5671);
      plainLoopback = tls.plainLoopback or false;
      file =
        what:
        if tls ? ${what} && builtins.isString tls.${what} && tls.${what} != "" then
          tls.${what}
        else
          throw "rabbitmq: tls.${what} must be a file path";
    in
    if tls == null then
      {
        configItems = numbered "listeners.tcp" plainPort;
        tailnetPort = if tailnetAddress == null then null else plainPort;
      }
    else
      {
        configItems =
          (
            if plainLoopback then
              { "listeners.tcp.1" = "127.0.0.1:${toString plainPort}"; }
            else
              { "listeners.tcp" = "none"; }
          )
          // numbered "listeners.ssl" tlsPort
          // {
            "ssl_options.cacertfile" = file "cacertfile";
            "ssl_options.certfile" = file "certfile";
            "ssl_options.keyfile" = file "keyfile";
            "ssl_options.verify" = "verify_peer";
            "ssl_options.fail_if_no_peer_cert" = "true";
          };
        tailnetPort = if tailnetAddress == null then null else tlsPort;
      };
in
{
  inherit
    definitions
    split
    smallBoxConfigItems
    listeners
    syncQueue
    applianceUser
    relayPermissions
    appliancePermissions
    ;
  # The users the definitions create, in order (for the password-setting unit).
  userNames =
    {
      appliances,
      relayUser ? "relay",
      ...
    }:
    [ relayUser ] ++ map applianceUser appliances;
  # Exported so the tests can pin the names the binaries use.
  names = {
    inherit
      syncExchange
      deadExchange
      deadQueue
      deadTallyQueue
      matchQueue
      legacyMatchQueue
      durableMatchQueue
      controlQueue
      matchQueueTtlMs
      defaultDeadLetterMaxLength
      defaultDeadLetterTtlH
      defaultSyncQueueExpiresH
      ;
  };
}
