# The relay module (nix/modules/relay.nix) evaluated by ./eval.nix, for nix/tests/relay.nix.
# `settings` is merged into services.comatching-relay (enable and package are set).
settings:
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
  ];
  # What the module reads from nixpkgs' own options.
  stubs = {
    systemd.package = pkgs.systemd;
    services.rabbitmq = {
      package = pkgs.rabbitmq-server;
      dataDir = "/var/lib/rabbitmq";
    };
    services.tailscale.enable = false;
  };
}
