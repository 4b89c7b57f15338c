# Everything flake.nix exports, in plain Nix so flake.nix stays thin.
{ self, nixpkgs, ... }:
let
  system = "x86_64-linux";
  pkgs = nixpkgs.legacyPackages.${system};
  inherit (nixpkgs) lib;

  comatching = pkgs.callPackage ./packages.nix { };

  # A NixOS module plus this flake's package as the default for its `package` option.
  withPackage =
    module: service: attr:
    { pkgs, ... }:
    {
      imports = [ module ];
      services.${service}.package = lib.mkDefault (
        self.packages.${pkgs.stdenv.hostPlatform.system}.${attr}
          or (throw "comatching: no ${attr} package for ${pkgs.stdenv.hostPlatform.system}; set services.${service}.package")
      );
    };
in
{
  packages.${system} = {
    inherit (comatching) cloud-relay appliance default;
    appliance-image = self.nixosConfigurations.appliance.config.system.build.image;
  };

  nixosModules = {
    relay = withPackage ./modules/relay.nix "comatching-relay" "cloud-relay";
    appliance = withPackage ./modules/appliance.nix "comatching-appliance" "appliance";
  };

  nixosConfigurations.appliance = lib.nixosSystem {
    modules = [
      { nixpkgs.hostPlatform = system; }
      self.nixosModules.appliance
      ../image/configuration.nix
    ];
  };

  checks.${system} = import ./checks.nix {
    inherit pkgs comatching;
    applianceSystem = self.nixosConfigurations.appliance;
  };
}
