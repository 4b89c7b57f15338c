# The appliance image's configuration (image/configuration.nix with its imports and the
# appliance module) evaluated by ./eval.nix, for nix/tests/image.nix. `extra` is one more module
# (site values, overrides).
extra:
let
  eval = import ./eval.nix;
  pkgs = import ./pkgs.nix;
in
eval {
  modules = [
    ../../modules/appliance.nix
    ../../../image/configuration.nix
    { services.comatching-appliance.package = pkgs.package "comatching-appliance"; }
    extra
  ];
  # What the modules read from nixpkgs' own options.
  stubs = {
    systemd.package = pkgs.systemd;
    services.tailscale.package = pkgs.tailscale;
    system.boot.loader.ukiFile = "comatching-edge.efi";
    boot.uki.name = "comatching-edge";
  };
}
