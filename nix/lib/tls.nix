# Transport security plumbing for the NixOS modules, in plain Nix (builtins only, tested offline
# by nix/tests/tls.nix): which systemd `LoadCredential=` lines and which TOML keys follow from a
# set of certificate files (and from the link key file, which is not TLS but travels the same
# way), the AMQP URL with or without TLS, and the rules the binaries enforce on `[broker]` and
# `[http]`, so a bad combination fails at evaluation rather than at start.
#
# Certificates, keys and the link key reach the services as systemd credentials
# (LoadCredential=ID:FILE):
# systemd (PID 1, as root) copies FILE into a private per-unit directory readable only by the
# unit's user, which is what a DynamicUser= service needs to read a root-only file.
#
# Why absolute /run/credentials/<unit>.service/<id> paths in the TOML: the config file is
# rendered into the Nix store once, so it cannot say `$CREDENTIALS_DIRECTORY` or `%d` (systemd
# expands those only in unit settings such as ExecStart= and Environment=, never inside a file
# the service reads). systemd puts a system unit's credentials in
# <runtime prefix>/credentials/<unit name> = /run/credentials/<unit>.service, and sets
# $CREDENTIALS_DIRECTORY to that same path (src/core/exec-credential.c, get_credential_directory),
# so the absolute path is exactly what the service sees, with or without mount namespacing.
# A *different* unit (the transient one `systemd-run` makes for the CLI wrappers) gets its
# copies under its own name; `cliExports` points the same keys at its $CREDENTIALS_DIRECTORY
# through the binaries' PREFIX__SECTION__KEY environment overrides.
let
  inherit (builtins)
    attrNames
    concatMap
    concatStringsSep
    filter
    isString
    match
    replaceStrings
    substring
    stringLength
    toJSON
    ;
  settings = import ./settings.nix;

  hasPrefix = p: s: substring 0 (stringLength p) s == p;
  hasSuffix =
    x: s:
    let
      n = stringLength s;
      m = stringLength x;
    in
    n >= m && substring (n - m) m s == x;

  # systemd's rule for credential ids is "a valid file name"; we keep to a safe subset.
  credentialId =
    id:
    if isString id && match "[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}" id != null then
      id
    else
      throw "tls: invalid credential id ${toJSON id} (1-64 of A-Z a-z 0-9 _ . -, not starting with . or -)";

  unitFile =
    unit:
    if !(isString unit) || match "[A-Za-z0-9_.@-]+" unit == null then
      throw "tls: invalid unit name ${toJSON unit}"
    else if hasSuffix ".service" unit then
      unit
    else
      "${unit}.service";

  # Where the unit `unit` (with or without ".service") sees the credential `id`.
  credentialPath = unit: id: "/run/credentials/${unitFile unit}/${credentialId id}";

  # What may be a credential's source: an absolute path that is not in the (world-readable)
  # store. A store path would work, but the key would then be readable by every local user.
  fileErrors =
    what: file:
    if file == null then
      [ ]
    else if !(isString file) || !(hasPrefix "/" file) then
      [ "${what} must be an absolute path (a string, not a Nix path: it must not be copied into the store), got ${toJSON file}" ]
    else if hasPrefix "/nix/store/" file then
      [ "${what} is in the Nix store (${file}), which every local user can read; keep certificates and keys outside it" ]
    else
      [ ];

  # credentials { unit; what; files = { <toml key> = { id; file; option; }; }; }
  #   -> { settings     = { <toml key> = credential path, or null when file is null; };
  #        loadCredential = [ "id:file" … ]   (only the files that are set);
  #        ids          = { <toml key> = id; } (only the files that are set);
  #        errors       = [ message … ] }
  # `file` may be null (not configured); `what` + "." + `option` names it in the messages
  # (e.g. "services.comatching-relay.https" + "certFile").
  credentials =
    {
      unit,
      what,
      files,
    }:
    let
      keys = attrNames files;
      set = filter (k: files.${k}.file != null) keys;
    in
    {
      settings = builtins.listToAttrs (
        map (k: {
          name = k;
          value = if files.${k}.file == null then null else credentialPath unit files.${k}.id;
        }) keys
      );
      loadCredential = map (k: "${credentialId files.${k}.id}:${files.${k}.file}") set;
      ids = builtins.listToAttrs (
        map (k: {
          name = k;
          value = files.${k}.id;
        }) set
      );
      errors = concatMap (k: fileErrors "${what}.${files.${k}.option}" files.${k}.file) keys;
    };

  # The relay's HTTPS listener: `[http] tls_cert`, `tls_key`.
  httpsServer =
    {
      unit,
      what,
      certFile ? null,
      keyFile ? null,
    }:
    credentials {
      inherit unit what;
      files = {
        tls_cert = {
          id = "https-cert.pem";
          file = certFile;
          option = "certFile";
        };
        tls_key = {
          id = "https-key.pem";
          file = keyFile;
          option = "keyFile";
        };
      };
    };

  # A binary as a broker client: `[broker] tls_ca`, `tls_cert`, `tls_key`.
  brokerClient =
    {
      unit,
      what,
      caFile ? null,
      certFile ? null,
      keyFile ? null,
    }:
    credentials {
      inherit unit what;
      files = {
        tls_ca = {
          id = "broker-ca.pem";
          file = caFile;
          option = "caFile";
        };
        tls_cert = {
          id = "broker-cert.pem";
          file = certFile;
          option = "certFile";
        };
        tls_key = {
          id = "broker-key.pem";
          file = keyFile;
          option = "keyFile";
        };
      };
    };

  # The link key, `[broker] link_key_file`: 64 hex digits (`comatching-relay pki link-key`), the
  # HMAC key every service of one deployment tags and checks broker messages with
  # (comatching_protocol::mac). A secret like a TLS key, so the same road: a credential of the
  # unit, never the store. `what` names the module (the option is `<what>.linkKeyFile`). The
  # binaries have no rule tying it to other keys (it works with amqp:// and amqps:// alike), so
  # there is nothing to mirror beyond the file checks.
  linkKey =
    {
      unit,
      what,
      file ? null,
    }:
    credentials {
      inherit unit what;
      files = {
        link_key_file = {
          id = "link.key";
          inherit file;
          option = "linkKeyFile";
        };
      };
    };

  # Lines for a shell wrapper run inside another unit that was given the same credentials:
  # `export PREFIX__SECTION__KEY="$CREDENTIALS_DIRECTORY/<id>"` per configured file.
  cliExports =
    prefix: section: creds:
    concatStringsSep "" (
      map (
        k: "export ${settings.envName prefix section k}=\"$CREDENTIALS_DIRECTORY/${creds.ids.${k}}\"\n"
      ) (attrNames creds.ids)
    );

  # amqpUrl { user; host; tls ? false; port ? 5671 or 5672; vhost ? "/"; } -> URL without password
  amqpUrl =
    {
      user,
      host,
      tls ? false,
      port ? null,
      vhost ? "/",
    }:
    let
      p =
        if port != null then
          port
        else if tls then
          5671
        else
          5672;
    in
    "${if tls then "amqps" else "amqp"}://${user}@${host}:${toString p}/${
      replaceStrings [ "%" "/" ] [ "%25" "%2f" ] vhost
    }";

  isSet = section: key: (section.${key} or null) != null;

  # The checks of BrokerSettings::check (protocol/src/config.rs), same wording; every failing
  # rule, not only the first. `broker` is the `[broker]` section as rendered.
  # `broker.url` is one URL or a list of them (a cluster's members, tried in turn); the rules
  # apply to the first, and the relay module asserts that the others use the same scheme.
  brokerErrors =
    broker:
    let
      raw = broker.url or "";
      url = if builtins.isList raw then (if raw == [ ] then "" else builtins.head raw) else raw;
      tls = hasPrefix "amqps://" url;
      anyFile = isSet broker "tls_ca" || isSet broker "tls_cert";
    in
    filter (m: m != null) [
      (if !tls && !(hasPrefix "amqp://" url) then "broker.url must start with amqp:// or amqps://" else null)
      (
        if isSet broker "tls_cert" != isSet broker "tls_key" then
          "broker.tls_cert and broker.tls_key go together: set both or neither"
        else
          null
      )
      (if !tls && anyFile then "broker.tls_* is set but broker.url is not amqps://" else null)
      (
        if tls && !(isSet broker "tls_ca") then
          "broker.url is amqps:// but broker.tls_ca is not set (the broker's certificate is checked against that CA only)"
        else
          null
      )
    ];

  # The relay's `[http]` rule (cloud-relay/src/config.rs, Config::check).
  httpErrors =
    http:
    if isSet http "tls_cert" != isSet http "tls_key" then
      [ "http.tls_cert and http.tls_key go together: set both or neither" ]
    else
      [ ];
in
{
  inherit
    credentialPath
    fileErrors
    credentials
    httpsServer
    brokerClient
    linkKey
    cliExports
    amqpUrl
    brokerErrors
    httpErrors
    ;
}
