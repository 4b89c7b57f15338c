# A small module evaluator for the evaluation tests: it evaluates this repository's real NixOS
# module files (nix/modules/*.nix, image/*.nix) with the stand-in `lib` of ./lib.nix and the fake
# packages of ./pkgs.nix, so the tests can assert on the units, files and settings they define
# without nixpkgs. It follows the module system's rules where the modules rely on them:
#
# * `imports` (paths only; nixpkgs' own modules, named through `modulesPath`, are skipped and
#   their options are stubbed by `stubs`), `options` / `config` or the shorthand form;
# * `mkIf` conditions are pushed down to the leaves, so a module may read its own options;
# * `mkMerge`, `mkDefault`/`mkForce`/`mkOverride` priorities, option defaults (priority 1500),
#   lists concatenated, attribute sets merged key by key, equal scalars merged, unequal ones an
#   error naming the path;
# * `types.submodule` options get their sub-options' defaults filled in (freeform keys pass).
#
# It does not check types, run assertions or know nixpkgs' options: `stubs` supplies the values
# the modules read from nixpkgs (systemd.package, services.tailscale.*, …) at default priority.
#
#   eval { modules; stubs ? { }; args ? { }; }
#     -> { config;           the evaluated configuration (what `config` is to the modules)
#          failedAssertions; the messages of assertions that do not hold
#          warnings;
#          defined; }        defined v: whether everything in v is defined. A unit the
#                            modules define only under a false mkIf still shows up as a name
#                            here (conditions are evaluated at the leaves), with every leaf
#                            undefined: `defined` is false for it.
let
  lib = import ./lib.nix;
  pkgs = import ./pkgs.nix;

  inherit (builtins)
    all
    attrNames
    concatLists
    concatMap
    filter
    foldl'
    head
    isAttrs
    isFunction
    isList
    isPath
    listToAttrs
    tail
    ;

  isNode = v: isAttrs v && !(v ? _type) && !(v ? outPath);
  isOption = v: isAttrs v && (v._type or null) == "option";
  unique = foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ];
  showPath = builtins.concatStringsSep ".";

  record = prio: value: {
    conds = [ ];
    inherit prio value;
  };

  # One definition → the list of { conds; prio; value } it stands for, `value` free of
  # mkIf/mkMerge/mkOverride at its top.
  pushDown =
    value:
    let
      t = if isAttrs value then value._type or null else null;
    in
    if t == "if" then
      map (r: r // { conds = [ value.condition ] ++ r.conds; }) (pushDown value.content)
    else if t == "merge" then
      concatMap pushDown value.contents
    else if t == "override" then
      map (r: r // { prio = if r.prio == 100 then value.priority else r.prio; }) (pushDown value.content)
    else
      [ (record 100 value) ];

  # The definitions of attribute `n` inside the node-valued records.
  children =
    n: records:
    concatMap (
      r:
      if isNode r.value && r.value ? ${n} then
        map (c: c // {
          conds = r.conds ++ c.conds;
          prio = if c.prio == 100 then r.prio else c.prio;
        }) (pushDown r.value.${n})
      else
        [ ]
    ) records;

  active = records: filter (r: all (c: c) r.conds) records;
  best =
    records:
    let
      p = foldl' (m: r: if r.prio < m then r.prio else m) 10000 records;
    in
    filter (r: r.prio == p) records;

  undefined = path: throw "eval: ${showPath path} is used but not defined";

  # Definitions of a path no option declares (or inside an option's value).
  mergeRaw =
    path: records:
    if records != [ ] && builtins.any (r: isNode r.value) records then
      let
        nodes = filter (r: isNode r.value) records;
        names = unique (concatMap (r: attrNames r.value) nodes);
      in
      listToAttrs (
        map (n: {
          name = n;
          value = mergeRaw (path ++ [ n ]) (children n nodes);
        }) names
      )
    else
      mergeLeaf path (best (active records));

  mergeLeaf =
    path: records:
    let
      values = map (r: r.value) records;
    in
    if records == [ ] then
      undefined path
    else if all isList values then
      concatLists values
    else if all (v: v == head values) (tail values) then
      head values
    else
      throw "eval: conflicting definitions of ${showPath path}: ${builtins.toJSON values}";

  evalAt =
    path: decl: records:
    if isOption decl then
      evalOption path decl records
    else if isAttrs decl then
      let
        names = unique (attrNames decl ++ concatMap (r: if isNode r.value then attrNames r.value else [ ]) records);
      in
      listToAttrs (
        map (n: {
          name = n;
          value = evalAt (path ++ [ n ]) (decl.${n} or null) (children n records);
        }) names
      )
    else
      mergeRaw path records;

  evalOption =
    path: o: records:
    let
      all' = records ++ (if o ? default then [ (record 1500 o.default) ] else [ ]);
      sub = o.type.submoduleOptions or null;
    in
    if sub != null then
      evalAt path sub (active all')
    else
      let
        chosen = best (active all');
      in
      if chosen == [ ] then undefined path else mergeRaw path chosen;

  # Module loading: a path, a function or an attribute set; `imports` followed for paths.
  load =
    args: m:
    let
      v = if isPath m then import m else m;
      r = if isFunction v then v args else v;
      explicit = r ? options || r ? config;
    in
    {
      options = r.options or { };
      config =
        if explicit then
          r.config or { }
        else
          removeAttrs r [
            "imports"
            "_file"
            "meta"
            "disabledModules"
          ];
      imports = filter isPath (r.imports or [ ]);
    };
  collect =
    args: ms:
    concatMap (
      m:
      let
        l = load args m;
      in
      [ l ] ++ collect args l.imports
    ) ms;
in
{
  modules,
  stubs ? { },
  args ? { },
}:
let
  allArgs = {
    inherit config lib pkgs;
    utils = import ./utils.nix;
    modulesPath = "/nixpkgs/nixos/modules";
    options = { };
  }
  // args;
  loaded = collect allArgs modules;
  decls = foldl' lib.recursiveUpdate { } (map (l: l.options) loaded);
  records = concatMap (l: pushDown l.config) loaded ++ [ (record 1500 stubs) ];
  config = evalAt [ ] decls records;
in
{
  inherit config;
  failedAssertions = map (a: a.message) (filter (a: !a.assertion) (config.assertions or [ ]));
  warnings = config.warnings or [ ];
  defined = v: (builtins.tryEval (builtins.deepSeq v true)).success;
}
