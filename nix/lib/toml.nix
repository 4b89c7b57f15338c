# Settings (an attribute set) → TOML text, with builtins only: no nixpkgs, so it evaluates and is
# tested offline (nix/tests/toml.nix). The NixOS modules render the binaries' config files with it.
#
# Rules:
# * top-level non-table values first, then one `[table]` per attribute set, nested as
#   `[a.b]`, all keys sorted (builtins.attrNames order), so the output is deterministic;
# * `null` values are left out (an unset optional setting falls back to the binary's default);
# * strings and paths become basic strings (JSON escaping is a subset of TOML's);
# * floats always carry a `.` or an exponent (TOML would read `1` as an integer);
# * lists become arrays; attribute sets inside lists become inline tables;
# * derivations (anything with `outPath`) are rendered as their store path;
# * functions and other values are refused with the key path in the message.
let
  inherit (builtins)
    attrNames
    concatStringsSep
    filter
    isAttrs
    isBool
    isFloat
    isInt
    isList
    isPath
    isString
    match
    toJSON
    typeOf
    ;

  isDerivationLike = v: isAttrs v && v ? outPath;
  isTable = v: isAttrs v && !(isDerivationLike v);

  key = k: if match "[A-Za-z0-9_-]+" k != null then k else toJSON k;

  float =
    v:
    let
      s = toJSON v;
    in
    if match ".*[.eE].*" s != null || match "-?(inf|nan)" s != null then s else "${s}.0";

  value =
    where: v:
    if isBool v then
      (if v then "true" else "false")
    else if isInt v then
      toString v
    else if isFloat v then
      float v
    else if isString v then
      toJSON v
    else if isPath v || isDerivationLike v then
      toJSON "${v}"
    else if isList v then
      "[" + concatStringsSep ", " (map (value "${where}[]") (filter (x: x != null) v)) + "]"
    else if isAttrs v then
      let
        names = filter (n: v.${n} != null) (attrNames v);
      in
      if names == [ ] then
        "{}"
      else
        "{ " + concatStringsSep ", " (map (n: "${key n} = ${value "${where}.${n}" v.${n}}") names) + " }"
    else
      throw "toml: cannot render a ${typeOf v} at ${where}";

  # All blocks (strings ending in a newline) for the table at `path` (a list of keys).
  blocks =
    path: attrs:
    let
      names = filter (n: attrs.${n} != null) (attrNames attrs);
      plain = filter (n: !(isTable attrs.${n})) names;
      tables = filter (n: isTable attrs.${n}) names;
      where = if path == [ ] then "<root>" else concatStringsSep "." path;
      lines = map (n: "${key n} = ${value "${where}.${n}" attrs.${n}}\n") plain;
      header = "[" + concatStringsSep "." (map key path) + "]\n";
      own =
        if path == [ ] then
          (if lines == [ ] then [ ] else [ (concatStringsSep "" lines) ])
        else if lines != [ ] || tables == [ ] then
          [ (header + concatStringsSep "" lines) ]
        else
          [ ];
    in
    own ++ builtins.concatLists (map (n: blocks (path ++ [ n ]) attrs.${n}) tables);
in
{
  # render :: attrs -> string
  render =
    settings:
    if !(isTable settings) then
      throw "toml: settings must be an attribute set, not a ${typeOf settings}"
    else
      concatStringsSep "\n" (blocks [ ] settings);
}
