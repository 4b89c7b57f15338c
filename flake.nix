# COMATCHING Edge, built reproducibly: `nix build .#cloud-relay`, `.#appliance`,
# `.#appliance-image`; NixOS modules `nixosModules.relay` / `.appliance`. The outputs live in
# nix/outputs.nix. There is no flake.lock in the repository until a maintainer's first
# `nix build` writes it; commit it then (docs/operations.md).
{
  description = "COMATCHING Edge: cloud relay, appliance and the appliance disk image";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = inputs: import ./nix/outputs.nix inputs;
}
