# Runs a list of test cases `{ name; actual; expected; }` (plain Nix, no nixpkgs).
# All pass: evaluates to the list of case names (scripts/nix-check.sh counts them).
# Any fails: throws with every failing case's expected and actual value, so
# `nix-instantiate --eval --strict` exits non-zero.
cases:
let
  inherit (builtins)
    concatStringsSep
    filter
    length
    match
    toJSON
    ;
  badName = filter (c: match "[A-Za-z0-9_./:+-]+" c.name == null) cases;
  failed = filter (c: c.actual != c.expected) cases;
  show = c: ''
    FAIL ${c.name}
      expected: ${toJSON c.expected}
      actual:   ${toJSON c.actual}'';
in
if badName != [ ] then
  throw "test names must match [A-Za-z0-9_./:+-]+: ${toJSON (map (c: c.name) badName)}"
else if failed != [ ] then
  throw (
    "${toString (length failed)} of ${toString (length cases)} cases failed:\n"
    + concatStringsSep "\n" (map show failed)
  )
else
  map (c: c.name) cases
