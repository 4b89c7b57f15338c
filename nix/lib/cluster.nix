# A RabbitMQ cluster for the relay module's `broker.cluster` (issue 15 §1), in plain Nix
# (builtins only; tested offline by nix/tests/cluster.nix). Kept apart from ./rabbitmq.nix, which
# holds the topology, the users and the listeners.
#
# Peer discovery is RabbitMQ's `classic_config`: every node lists every member's node name, and a
# node that boots finds the others and joins them (or forms the cluster when it is the first).
# Node names are rabbit@<host name>, so each host name must resolve, on every member, to an
# address the others reach (MagicDNS names on the tailnet). The Erlang distribution (epmd 4369,
# node port 25672) then runs between the members, authenticated by the shared Erlang cookie.
let
  inherit (builtins)
    attrNames
    concatStringsSep
    filter
    genList
    elemAt
    length
    listToAttrs
    match
    toJSON
    ;

  # RFC 1123 labels, dot-separated; a node name is rabbit@<this>.
  checkHost =
    h:
    if match "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?([.][a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*" h != null then
      h
    else
      throw "cluster: invalid host name ${toJSON h} (lower-case letters, digits, '-', '.')";

  nodeName = host: "rabbit@${checkHost host}";

  # The members in a fixed order: this host first, then the peers as given.
  members =
    {
      self,
      peers,
    }:
    let
      all = [ self ] ++ peers;
      distinct = attrNames (listToAttrs (map (h: {
        name = h;
        value = null;
      }) all));
    in
    if length distinct != length all then
      throw "cluster: duplicate host among ${toJSON all} (list the other members in peers, not this host)"
    else
      map checkHost all;
in
{
  inherit nodeName members;

  # Ports of the Erlang distribution the members must reach on each other: epmd, and the node's
  # distribution port (RabbitMQ's default, the AMQP port 5672 + 20000).
  distributionPorts = [
    4369
    25672
  ];

  # Problems that make the cluster unsafe, as messages (empty when fine).
  errors =
    { peers, ... }:
    let
      n = 1 + length peers;
    in
    filter (m: m != null) [
      (
        if n < 3 then
          "a cluster needs at least 3 nodes (this host and 2 peers): with 2, pause_minority pauses both halves of any partition, and quorum queues lose their majority with either node"
        else
          null
      )
      (if n / 2 * 2 == n then "an even number of nodes (${toString n}) tolerates no more failures than ${toString (n - 1)}; use an odd number" else null)
    ];

  # services.rabbitmq.configItems for the cluster.
  configItems =
    args:
    let
      ms = members args;
    in
    {
      "cluster_formation.peer_discovery_backend" = "classic_config";
      # A minority side of a partition stops serving instead of diverging; its clients fail
      # over to the majority (the services' broker.url lists every member).
      "cluster_partition_handling" = "pause_minority";
    }
    // listToAttrs (
      genList (i: {
        name = "cluster_formation.classic_config.nodes.${toString (i + 1)}";
        value = nodeName (elemAt ms i);
      }) (length ms)
    );

  # For messages and docs.
  describe = args: concatStringsSep ", " (map nodeName (members args));
}
