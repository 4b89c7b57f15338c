# Evaluation tests for the flake's plumbing (nix/outputs.nix, nix/packages.nix) against a tiny
# fake nixpkgs: output names, one derivation per binary with the right `-p`, the lib.fileset
# source selection, the module/package wiring and the image path. The real build needs nixpkgs
# and runs with `nix build` / `nix flake check`.
let
  drv = name: extra: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  } // extra;

  fakeLib = {
    fileset = {
      unions = xs: xs;
      toSource = args: args;
    };
    importTOML = p: builtins.fromTOML (builtins.readFile p);
    licenses.mit = "mit";
    platforms.linux = [ "x86_64-linux" ];
    mkDefault = x: {
      _default = x;
    };
    versionAtLeast = a: b: builtins.compareVersions a b >= 0;
    nixosSystem = args: {
      inherit (args) modules;
      config.system.build = {
        image = drv "image" { };
        toplevel = drv "toplevel" { };
      };
    };
  };

  pkgs = {
    rustPlatform = {
      buildRustPackage = args: drv args.pname { inherit args; };
      rust.rustc.version = "1.91.1";
    };
    rustc.version = "1.91.1";
    symlinkJoin = args: drv args.name { inherit (args) paths; };
    runCommand = name: env: _script: drv name { inherit env; };
    rustfmt = drv "rustfmt" { };
    clippy = drv "clippy" { };
    lib = fakeLib // {
      hasSuffix =
        suffix: s:
        let
          n = builtins.stringLength s;
          m = builtins.stringLength suffix;
        in
        n >= m && builtins.substring (n - m) m s == suffix;
    };
    callPackage =
      f: extra:
      let
        fn = import f;
      in
      fn ((builtins.intersectAttrs (builtins.functionArgs fn) pkgs) // { lib = fakeLib; } // extra);
  };

  self = import ../outputs.nix {
    inherit self;
    nixpkgs = {
      lib = fakeLib;
      legacyPackages.x86_64-linux = pkgs;
    };
  };
  packages = self.packages.x86_64-linux;
  relayArgs = packages.cloud-relay.args;
  applianceArgs = packages.appliance.args;
  rel = p: builtins.substring (builtins.stringLength (toString ../..) + 1) 1000 (toString p);

  # packages.nix with a toolchain older than the workspace's rust-version.
  withRustc =
    version:
    pkgs.callPackage ../packages.nix {
      rustPlatform = pkgs.rustPlatform // {
        rust.rustc = { inherit version; };
      };
    };
  builds = p: (builtins.tryEval (builtins.deepSeq p.cloud-relay.name true)).success;
  rustVersion = (builtins.fromTOML (builtins.readFile ../../Cargo.toml)).workspace.package.rust-version;

  # The module wrapper sets the package default from the flake's packages.
  relayModule = self.nixosModules.relay {
    pkgs.stdenv.hostPlatform.system = "x86_64-linux";
  };
in
import ./harness.nix [
  {
    name = "package-names";
    actual = builtins.attrNames packages;
    expected = [
      "appliance"
      "appliance-image"
      "cloud-relay"
      "default"
    ];
  }
  {
    name = "one-crate-per-derivation";
    actual = [
      relayArgs.cargoBuildFlags
      applianceArgs.cargoBuildFlags
      relayArgs.pname
      applianceArgs.pname
    ];
    expected = [
      [
        "-p"
        "comatching-relay"
      ]
      [
        "-p"
        "comatching-appliance"
      ]
      "comatching-relay"
      "comatching-appliance"
    ];
  }
  {
    name = "fileset-is-cargo-only";
    actual = map rel relayArgs.src.fileset;
    expected = [
      "Cargo.toml"
      "Cargo.lock"
      "protocol"
      "cloud-relay"
      "appliance"
      "tests"
    ];
  }
  {
    name = "lockfile-and-version";
    actual = [
      (rel relayArgs.cargoLock.lockFile)
      relayArgs.version
      relayArgs.meta.mainProgram
    ];
    expected = [
      "Cargo.lock"
      (builtins.fromTOML (builtins.readFile ../../Cargo.toml)).workspace.package.version
      "comatching-relay"
    ];
  }
  {
    name = "default-is-both";
    actual = map (p: p.name) packages.default.paths;
    expected = [
      "comatching-relay"
      "comatching-appliance"
    ];
  }
  {
    name = "image-is-the-system-image";
    actual = packages.appliance-image.name;
    expected = "image";
  }
  {
    name = "modules-and-configurations";
    actual = [
      (builtins.attrNames self.nixosModules)
      (builtins.attrNames self.nixosConfigurations)
      (builtins.length self.nixosConfigurations.appliance.modules)
    ];
    expected = [
      [
        "appliance"
        "relay"
      ]
      [ "appliance" ]
      3
    ];
  }
  {
    name = "module-defaults-the-flake-package";
    actual = relayModule.services.comatching-relay.package._default.name;
    expected = "comatching-relay";
  }
  {
    # finding 6: a pinned rustc older than rust-version fails at evaluation, naming both.
    name = "finding6:toolchain-at-least-rust-version";
    actual = {
      older = builds (withRustc "1.88.0");
      same = builds (withRustc "${rustVersion}.0");
      newer = builds (withRustc "1.91.1");
    };
    expected = {
      older = false;
      same = true;
      newer = true;
    };
  }
  {
    name = "checks";
    actual = builtins.attrNames self.checks.x86_64-linux;
    expected = [
      "appliance"
      "appliance-system"
      "clippy"
      "cloud-relay"
      "fmt"
      "nix-lib"
    ];
  }
]
