# Evaluation tests for nix/lib/cluster.nix: node names, the classic_config items, refusal of
# unsafe member counts and bad host names. The module's use of it is in nix/tests/relay.nix.
let
  cl = import ../lib/cluster.nix;
  fails = x: !(builtins.tryEval (builtins.deepSeq x true)).success;
  three = {
    self = "relay-a";
    peers = [
      "broker-b"
      "broker-c.tail1234.ts.net"
    ];
  };
in
import ./harness.nix [
  {
    name = "config-items";
    actual = cl.configItems three;
    expected = {
      "cluster_formation.peer_discovery_backend" = "classic_config";
      "cluster_formation.classic_config.nodes.1" = "rabbit@relay-a";
      "cluster_formation.classic_config.nodes.2" = "rabbit@broker-b";
      "cluster_formation.classic_config.nodes.3" = "rabbit@broker-c.tail1234.ts.net";
      "cluster_partition_handling" = "pause_minority";
    };
  }
  {
    name = "three-or-five-members-are-fine";
    actual = [
      (cl.errors three)
      (cl.errors (three // { peers = three.peers ++ [ "d" "e" ]; }))
    ];
    expected = [
      [ ]
      [ ]
    ];
  }
  {
    name = "two-or-four-members-are-refused";
    actual = map (p: builtins.length (cl.errors (three // { peers = p; }))) [
      [ "b" ]
      [ "b" "c" "d" ]
    ];
    expected = [
      2
      1
    ];
  }
  {
    name = "bad-host-names-and-duplicates-are-refused";
    actual = map (args: fails (cl.configItems args)) [
      (three // { peers = [ "Broker-B" "c" ]; })
      (three // { peers = [ "b" "rabbit@c" ]; })
      (three // { peers = [ "b" "-c" ]; })
      (three // { peers = [ "relay-a" "c" ]; })
      (three // { peers = [ "b" "b" ]; })
      three
    ];
    expected = [
      true
      true
      true
      true
      true
      false
    ];
  }
  {
    name = "distribution-ports";
    actual = cl.distributionPorts;
    expected = [
      4369
      25672
    ];
  }
]
