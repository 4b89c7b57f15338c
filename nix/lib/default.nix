# Plain-Nix helpers (builtins only, no nixpkgs): evaluated offline by scripts/nix-check.sh and
# used by the NixOS modules in nix/modules/.
{
  cluster = import ./cluster.nix;
  toml = import ./toml.nix;
  rabbitmq = import ./rabbitmq.nix;
  settings = import ./settings.nix;
  systemd = import ./systemd.nix;
  tls = import ./tls.nix;
}
