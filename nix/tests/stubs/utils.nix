# The part of nixpkgs' NixOS `utils` the modules use, for ./eval.nix.
{
  # systemd-escape --path, for the device paths the modules name (letters, digits, '/', '-', '.').
  escapeSystemdPath =
    s:
    let
      trimmed = builtins.head (builtins.match "/*(.*[^/])/*" s);
    in
    builtins.replaceStrings [ "-" "/" ] [ "\\x2d" "-" ] trimmed;
}
