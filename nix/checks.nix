# `nix flake check`: the builds, clippy with warnings denied, rustfmt, the plain-Nix evaluation
# tests (evaluated here, at evaluation time: a failing case throws and fails the check), and the
# appliance system itself (evaluating it runs every module assertion).
{
  pkgs,
  comatching,
  applianceSystem,
}:
let
  inherit (comatching) src cloud-relay appliance;

  # The names of the passing cases of every nix/tests/*.nix (throws on the first failing file).
  testFiles = builtins.filter (f: f != "harness.nix" && pkgs.lib.hasSuffix ".nix" f) (
    builtins.attrNames (builtins.readDir ./tests)
  );
  nixLibCases = map (f: import (./tests + "/${f}")) testFiles;
in
{
  inherit cloud-relay appliance;

  clippy = cloud-relay.overrideAttrs (old: {
    pname = "comatching-clippy";
    nativeBuildInputs = old.nativeBuildInputs ++ [ pkgs.clippy ];
    buildPhase = ''
      runHook preBuild
      cargo clippy --offline --workspace --all-targets -- -D warnings
      runHook postBuild
    '';
    installPhase = "touch $out";
    doCheck = false;
  });

  fmt =
    pkgs.runCommand "comatching-fmt"
      {
        nativeBuildInputs = [ pkgs.rustfmt ];
      }
      ''
        cd ${src}
        find . -name '*.rs' -print0 | xargs -0 rustfmt --check --edition 2024
        touch $out
      '';

  nix-lib =
    pkgs.runCommand "comatching-nix-lib-tests"
      {
        cases = builtins.toJSON nixLibCases;
      }
      ''
        echo "$cases" > $out
      '';

  appliance-system = applianceSystem.config.system.build.toplevel;
}
