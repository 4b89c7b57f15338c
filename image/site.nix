# Site values of the festival box. Edit before `nix build .#appliance-image`; none of this is
# secret (passwords and the tailscale key are provisioned onto the ESP, see docs/operations.md).
{
  comatching.site = {
    # Broker user appliance-<id>, sync queue comatching.sync.<id>; must be listed in the relay's
    # services.comatching-relay.broker.appliances.
    applianceId = "edge-1";
    hostName = "comatching-edge";
    # The relay's broker by its tailnet (MagicDNS) name; the password comes with appliance.env.
    brokerUrl = "amqp://appliance-edge-1@comatching-relay:5672/%2f";
    # Maintainers' ssh public keys ("ssh-ed25519 AAAA… name"), for root over the tailnet.
    sshKeys = [ ];
  };
}
