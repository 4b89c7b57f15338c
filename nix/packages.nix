# The two binaries, one derivation each, built from one source set limited with lib.fileset to
# what Cargo needs (the workspace manifest and lock, and every member's sources, because Cargo
# reads all members' manifests). Editing nix/, image/, docs/ or scripts/ does not rebuild Rust.
{
  lib,
  rustPlatform,
  rustc,
  symlinkJoin,
}:
let
  root = ../.;
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      (root + "/Cargo.toml")
      (root + "/Cargo.lock")
      (root + "/protocol")
      (root + "/cloud-relay")
      (root + "/appliance")
      (root + "/tests")
    ];
  };
  inherit ((lib.importTOML (root + "/Cargo.toml")).workspace.package) version rust-version;

  # The workspace's `rust-version` is the oldest rustc that builds it. A pinned nixpkgs with an
  # older one would fail deep inside cargo with a message about some dependency; say it here,
  # at evaluation, with both versions (issue 15, finding 6). rustPlatform carries the rustc it
  # builds with; pkgs.rustc is the same unless someone overrides rustPlatform.
  toolchain = rustPlatform.rust.rustc.version or rustc.version;
  checkToolchain =
    drv:
    if lib.versionAtLeast toolchain rust-version then
      drv
    else
      throw "comatching: the pinned nixpkgs has rustc ${toolchain}, but the workspace needs ${rust-version} (rust-version in Cargo.toml); move flake.lock to a newer nixpkgs or lower rust-version";

  crate =
    {
      pname,
      package,
      description,
    }:
    checkToolchain (rustPlatform.buildRustPackage {
      inherit pname version src;
      cargoLock.lockFile = root + "/Cargo.lock";
      cargoBuildFlags = [
        "-p"
        package
      ];
      # The test suites need a running broker; scripts/test.sh runs them in CI.
      doCheck = false;
      # Everything is pure Rust with rustls/ring; SQLite is compiled from rusqlite's bundled copy
      # with stdenv's C compiler. No OpenSSL, no pkg-config.
      meta = {
        inherit description;
        mainProgram = package;
        license = lib.licenses.mit;
        platforms = lib.platforms.linux;
      };
    });
in
rec {
  inherit src;

  cloud-relay = crate {
    pname = "comatching-relay";
    package = "comatching-relay";
    description = "COMATCHING Edge cloud relay";
  };

  appliance = crate {
    pname = "comatching-appliance";
    package = "comatching-appliance";
    description = "COMATCHING Edge appliance: replica, matcher, status page";
  };

  default = symlinkJoin {
    name = "comatching-edge-${version}";
    paths = [
      cloud-relay
      appliance
    ];
  };
}
