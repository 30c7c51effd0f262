#!/bin/sh
# provision-box.sh CLIENT_NIC_MAC SERVER_NIC_MAC
#
# Turns the lab's "box" VM into a ghostwire appliance: what `make install`
# does, from the host-built binary in the synced /ghostwire, plus a config
# naming the two lab NICs (found by MAC), then enables and (re)starts the
# units. Run as root by Vagrant; safe to run again (`vagrant provision box`).
set -eu

src=/ghostwire
conf=/etc/ghostwire/ghostwire.yaml

die() { echo "provision-box: $*" >&2; exit 1; }

[ $# -eq 2 ] || die "usage: $0 CLIENT_NIC_MAC SERVER_NIC_MAC"

# nic_by_mac prints the name of the interface with MAC $1.
nic_by_mac() {
	for d in /sys/class/net/*; do
		if [ "$(cat "$d/address")" = "$1" ]; then
			basename "$d"
			return 0
		fi
	done
	die "no interface has MAC $1 (ip -br link: $(ip -br link | tr '\n' ';'))"
}
client_nic=$(nic_by_mac "$1")
server_nic=$(nic_by_mac "$2")
echo "provision-box: client_nic=$client_nic server_nic=$server_nic"

[ -x "$src/bin/ghostwire" ] ||
	die "$src/bin/ghostwire is missing: on the host run 'CGO_ENABLED=0 make build', then 'vagrant rsync box && vagrant provision box'"
"$src/bin/ghostwire" --help >/dev/null 2>&1 ||
	die "$src/bin/ghostwire does not run here (built for another OS/arch, or linked against a newer glibc?): rebuild with CGO_ENABLED=0 GOOS=linux GOARCH=amd64 make build"

# nftables: `nft list ruleset` to look at the diversion; make: install-files.
if ! command -v nft >/dev/null || ! command -v make >/dev/null; then
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables make >/dev/null
fi

# Debian's kernel builds the bridge and br_netfilter as modules. ghostwire
# apply sets net.bridge.bridge-nf-call-*=0, and those keys exist only once
# br_netfilter is loaded; loading it at boot (before ghostwire-provision,
# which is ordered after systemd-modules-load) keeps a later load from
# resetting them to 1.
printf 'bridge\nbr_netfilter\n' >/etc/modules-load.d/ghostwire.conf
modprobe bridge
modprobe br_netfilter

# What `make install PREFIX=/usr/local` installs, minus the Go build.
make -s -C "$src" install-files PREFIX=/usr/local

cat >"$conf" <<EOF
# Written by vagrant/provision-box.sh; every key is explained in
# /etc/ghostwire/ghostwire.yaml.example.
bridge:
  name: br0
  client_nic: $client_nic
  server_nic: $server_nic
  # A management address on the lab segment (ssh/ping the box from the
  # client); the proxy works without one given routes: [192.0.2.0/24].
  addresses: [192.0.2.254/24]
  routes: []
intercept:
  tcp_ports: [80, 443]
proxy:
  tcp_port: 9876
log:
  level: debug
EOF
chmod 0644 "$conf"

# Start provisioning only once both NICs exist, and stop it if one goes.
mkdir -p /etc/systemd/system/ghostwire-provision.service.d
cat >/etc/systemd/system/ghostwire-provision.service.d/nics.conf <<EOF
[Unit]
BindsTo=sys-subsystem-net-devices-$client_nic.device sys-subsystem-net-devices-$server_nic.device
After=sys-subsystem-net-devices-$client_nic.device sys-subsystem-net-devices-$server_nic.device
EOF

systemctl daemon-reload
# enable ghostwire enables ghostwire-provision too (Also=). Restarting the
# provisioning restarts the proxy after it (Requires=), on a new binary or
# config alike.
systemctl enable ghostwire.service
systemctl restart ghostwire-provision.service ghostwire.service

ghostwire status -c "$conf" || true
