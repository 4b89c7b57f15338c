# Fake packages for ./eval.nix: every derivation is an attribute set with a recognisable store
# path and the arguments it was made from, so tests can read back what a module generated (the
# text of a writeText, the script of a writeShellScript, the entries of a linkFarm).
let
  drv =
    name: extra:
    {
      type = "derivation";
      inherit name;
      outPath = "/nix/store/00000000000000000000000000000000-${name}";
    }
    // extra;
  package = name: drv name { pname = name; };
in
{
  inherit drv package;
  bash = package "bash";
  coreutils = package "coreutils";
  util-linux = package "util-linux";
  e2fsprogs = package "e2fsprogs";
  systemd = package "systemd";
  rabbitmq-server = package "rabbitmq-server";
  tailscale = package "tailscale";
  litestream = package "litestream";
  gnugrep = package "gnugrep";
  jq = package "jq";
  rclone = package "rclone";
  buildPackages.systemdUkify = package "systemd-ukify";
  stdenv.hostPlatform = {
    efiArch = "x64";
    system = "x86_64-linux";
  };
  writeText = name: text: drv name { inherit text; };
  writeShellScript = name: text: drv name { inherit text; };
  writeShellScriptBin = name: text: drv name { inherit text; };
  linkFarm = name: entries: drv name { inherit entries; };
  runCommand = name: env: script: drv name { inherit env script; };
  formats = {
    ini = _: {
      generate = name: value: drv name { inherit value; };
    };
    yaml = _: {
      generate = name: value: drv name { inherit value; };
    };
  };
}
