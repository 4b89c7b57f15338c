# Provisioning without typing on the box: before the first boot, maintainers copy the secrets onto
# the ESP of the flashed disk (a FAT partition any laptop can mount):
#
#   <ESP>/comatching/tailscale-authkey   a tailscale auth key (tskey-auth-…)
#   <ESP>/comatching/appliance.env       COMATCHING_APPLIANCE__BROKER__URL=amqps://appliance-<id>:…@…
#   <ESP>/comatching/broker-ca.pem       with comatching.site.brokerTls: our CA's certificate (ca.pem),
#   <ESP>/comatching/broker-client.pem   this box's client certificate (appliance-<id>.pem)
#   <ESP>/comatching/broker-client.key   and its key (appliance-<id>.key), from `comatching-relay pki`
#   <ESP>/comatching/link.key            with comatching.site.linkKey: the deployment's link key,
#                                        the relay's own file (`comatching-relay pki link-key`)
#
# At boot this unit moves them to /var/lib/comatching-provision (data partition, root-only) and
# erases them from the ESP (overwritten, then unlinked: ./provision.sh), before tailscale's
# autoconnect and the appliance start. Any other file in <ESP>/comatching/ is erased too, with a
# journal line naming it: it is most likely a secret under a wrong name. Nothing
# secret is ever in the Nix store or in the image. The appliance unit gets the three TLS files
# and the link key as systemd credentials (image/configuration.nix,
# services.comatching-appliance.brokerClient and .linkKeyFile). The files stay on the data
# partition across reboots; a re-image or factory reset wipes them (copy them onto the ESP
# again).
{ lib, pkgs, ... }:
let
  espDir = "/boot/comatching";
  dir = "/var/lib/comatching-provision";
  files = [
    "tailscale-authkey"
    "appliance.env"
    "broker-ca.pem"
    "broker-client.pem"
    "broker-client.key"
    "link.key"
  ];
in
{
  options.comatching.provisionDir = lib.mkOption {
    type = lib.types.str;
    default = dir;
    readOnly = true;
    description = "Where provisioned secrets live on the box (data partition).";
  };

  config = {
    systemd.services.comatching-provision = {
      description = "Move provisioning secrets from the ESP to the data partition";
      wantedBy = [ "multi-user.target" ];
      before = [
        "tailscaled-autoconnect.service"
        "comatching-appliance.service"
      ];
      unitConfig = {
        RequiresMountsFor = [
          "/boot"
          "/var/lib"
        ];
        ConditionDirectoryNotEmpty = espDir;
      };
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        UMask = "0077";
      };
      # fstrim (util-linux) discards the ESP's freed clusters after the files are erased.
      path = [ pkgs.util-linux ];
      script = ''
        esp_dir=${espDir}
        esp_mount=/boot
        dir=${dir}
        files=${lib.escapeShellArg (lib.concatStringsSep " " files)}
      ''
      + builtins.readFile ./provision.sh;
    };

    # Provisioned files are read by tailscaled-autoconnect (as root) and, for the appliance
    # unit, by systemd as root (EnvironmentFile=, LoadCredential=); nobody else needs them.
    systemd.tmpfiles.rules = [ "d ${dir} 0700 root root -" ];
  };
}
