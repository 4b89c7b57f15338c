# Site values of the festival box. Edit before `nix build .#appliance-image`; none of this is
# secret (passwords, the tailscale key, the broker TLS certificate and key and the link key are
# provisioned onto the ESP, see docs/operations.md §3).
{
  comatching.site = {
    # Broker user appliance-<id>, sync queue comatching.sync.<id>; must be listed in the relay's
    # services.comatching-relay.broker.appliances.
    applianceId = "edge-1";
    hostName = "comatching-edge";
    # The relay's broker by its tailnet (MagicDNS) name, a name in the broker's certificate.
    brokerHost = "comatching-relay";
    # AMQP over TLS with a client certificate: the URL becomes
    # amqps://appliance-edge-1@comatching-relay:5671/%2f (the password comes with
    # appliance.env), and broker-ca.pem, broker-client.pem, broker-client.key must be
    # provisioned. Needs services.comatching-relay.broker.tls.enable on the relay.
    brokerTls = true;
    # Every broker message carries an HMAC tag of the deployment's link key, and untagged ones
    # are refused: link.key (the relay's file, `comatching-relay pki link-key`) must be
    # provisioned, and the relay needs services.comatching-relay.linkKeyFile set to the same
    # file. Why the shipped image requires it: image/configuration.nix, comatching.site.linkKey.
    linkKey = true;
    # Maintainers' ssh public keys ("ssh-ed25519 AAAA… name"), for root over the tailnet.
    sshKeys = [ ];
  };
}
