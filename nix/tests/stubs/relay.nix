# The relay module (nix/modules/relay.nix) evaluated by ./eval.nix, for nix/tests/relay.nix.
# `settings` is merged into services.comatching-relay (enable and package are set); `extra` is
# one more module (e.g. another host name, or the relay switched off on a broker-only member).
{
  settings,
  extra ? { },
}:
let
  eval = import ./eval.nix;
  pkgs = import ./pkgs.nix;
in
eval {
  modules = [
    ../../modules/relay.nix
    {
      services.comatching-relay = {
        enable = true;
        package = pkgs.package "comatching-relay";
      };
    }
    { services.comatching-relay = settings; }
    extra
  ];
  # What the module reads from nixpkgs' own options.
  stubs = {
    systemd.package = pkgs.systemd;
    services.rabbitmq = {
      package = pkgs.rabbitmq-server;
      dataDir = "/var/lib/rabbitmq";
    };
    services.tailscale.enable = false;
    networking.hostName = "comatching-relay";
  };
}
