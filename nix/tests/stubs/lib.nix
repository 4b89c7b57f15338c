# A stand-in for the part of nixpkgs' `lib` that this repository's NixOS modules use, in plain Nix
# (builtins only), so nix/tests/ can evaluate the real module files offline (nixpkgs cannot be
# fetched here). The property and option constructors build the same shapes as nixpkgs
# (`_type = "if" | "merge" | "override" | "option"`), which ./eval.nix interprets. Types only
# carry what evaluation needs: `submodule` keeps its options so defaults can be filled in; no
# type is checked (the real module system does that at `nix build`).
let
  inherit (builtins)
    all
    any
    attrNames
    concatLists
    elemAt
    filter
    foldl'
    genList
    isAttrs
    isString
    length
    listToAttrs
    mapAttrs
    replaceStrings
    split
    stringLength
    substring
    ;

  lowers = genList (i: substring i 1 "abcdefghijklmnopqrstuvwxyz") 26;
  uppers = genList (i: substring i 1 "ABCDEFGHIJKLMNOPQRSTUVWXYZ") 26;

  type = name: { inherit name; };
  types = {
    str = type "str";
    lines = type "lines";
    bool = type "bool";
    int = type "int";
    float = type "float";
    path = type "path";
    port = type "port";
    package = type "package";
    attrs = type "attrs";
    anything = type "anything";
    ints = {
      positive = type "positive int";
      unsigned = type "unsigned int";
      between = _lo: _hi: type "int between";
    };
    listOf = _: type "list";
    attrsOf = _: type "attrs";
    nullOr = t: t // { nullable = true; };
    either = a: _b: a;
    oneOf = ts: elemAt ts 0;
    enum = values: type "enum" // { inherit values; };
    strMatching = _: type "str";
    submodule =
      m:
      type "submodule"
      // {
        submoduleOptions = m.options or { };
      };
  };

  recursiveUpdate =
    a: b:
    a
    // mapAttrs (
      n: v: if isAttrs v && isAttrs (a.${n} or null) && !(v ? _type) then recursiveUpdate a.${n} v else v
    ) b;

  splitString = sep: s: filter isString (split (replaceStrings [ "." "+" "*" "?" "[" "]" "(" ")" "|" "^" "$" ] [ "\\." "\\+" "\\*" "\\?" "\\[" "\\]" "\\(" "\\)" "\\|" "\\^" "\\$" ] sep) s);

  escapeShellArg =
    s:
    let
      str = toString s;
    in
    if builtins.match "[A-Za-z0-9_./:=@%+,-]+" str != null then str else "'${replaceStrings [ "'" ] [ "'\\''" ] str}'";
in
rec {
  inherit types recursiveUpdate splitString escapeShellArg;

  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = description: {
    _type = "option";
    type = types.bool;
    default = false;
    inherit description;
  };
  mkPackageOption =
    _pkgs: name: _extra:
    mkOption { type = types.package; description = "package ${toString name}"; };
  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };
  literalMD = text: {
    _type = "literalMD";
    inherit text;
  };

  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };
  mkMerge = contents: {
    _type = "merge";
    inherit contents;
  };
  mkOverride = priority: content: {
    _type = "override";
    inherit priority content;
  };
  mkDefault = mkOverride 1000;
  mkOptionDefault = mkOverride 1500;
  mkForce = mkOverride 50;
  mkBefore = x: x;
  mkAfter = x: x;

  optional = c: x: if c then [ x ] else [ ];
  optionals = c: xs: if c then xs else [ ];
  optionalAttrs = c: a: if c then a else { };
  optionalString = c: s: if c then s else "";
  concatMapStringsSep = sep: f: xs: concatStringsSep sep (map f xs);
  concatStringsSep = builtins.concatStringsSep;
  concatMap = builtins.concatMap;
  mapAttrsToList = f: a: map (n: f n a.${n}) (attrNames a);
  filterAttrs = f: a: listToAttrs (map (n: { name = n; value = a.${n}; }) (filter (n: f n a.${n}) (attrNames a)));
  nameValuePair = name: value: { inherit name value; };
  genAttrs = names: f: listToAttrs (map (n: { name = n; value = f n; }) names);
  inherit all any mapAttrs concatLists listToAttrs attrNames filter foldl';
  elem = builtins.elem;
  head = builtins.head;
  last = xs: elemAt xs (length xs - 1);
  unique = foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ];
  toUpper = replaceStrings lowers uppers;
  toLower = replaceStrings uppers lowers;
  hasPrefix = p: s: substring 0 (stringLength p) s == p;
  removePrefix =
    p: s:
    if hasPrefix p s then substring (stringLength p) (stringLength s - stringLength p) s else s;
  hasSuffix =
    x: s:
    let
      n = stringLength s;
      m = stringLength x;
    in
    n >= m && substring (n - m) m s == x;
  toInt =
    s:
    if builtins.match "[0-9]+" s != null then builtins.fromJSON s else throw "toInt: not an integer: ${s}";
  max = a: b: if a > b then a else b;
  min = a: b: if a < b then a else b;
  isDerivation = v: isAttrs v && (v.type or null) == "derivation";
  escapeShellArgs = xs: concatStringsSep " " (map escapeShellArg xs);
  getExe' = pkg: bin: "${pkg}/bin/${bin}";
  getExe = pkg: "${pkg}/bin/${pkg.meta.mainProgram or pkg.pname or pkg.name}";
  makeBinPath = xs: concatStringsSep ":" (map (p: "${p}/bin") xs);
  versionAtLeast = a: b: builtins.compareVersions a b >= 0;
  versionOlder = a: b: builtins.compareVersions a b < 0;
  id = x: x;
}
