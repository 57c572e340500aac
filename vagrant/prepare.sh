#!/usr/bin/env bash
# Prepares what the VMs get, on this host: vagrant/bin with the static nodelet binary
# (integration/scripts/build-static.sh) and kubeadm (built from the Go module proxy by the test bed), and the
# cluster's CA (vagrant/.pki, made once), so that the workers know its hash before the control plane exists.
# The VMs copy the checkout in at `vagrant up` (rsync).
set -euo pipefail
cd "$(dirname "$0")/.."
static=$(integration/scripts/build-static.sh | tail -1 | cut -d: -f1)
kubeadm=$(integration/scripts/build-control-plane.sh | tail -1)/kubeadm
mkdir -p vagrant/bin
install -m 0755 "$static" vagrant/bin/nodelet
install -m 0755 "$kubeadm" vagrant/bin/kubeadm
if [ ! -f vagrant/.pki/ca.key ]; then
  mkdir -p vagrant/.pki
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=kubernetes \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign \
    -keyout vagrant/.pki/ca.key -out vagrant/.pki/ca.crt 2>/dev/null
fi
hash=$(openssl x509 -pubkey -noout -in vagrant/.pki/ca.crt | openssl pkey -pubin -outform der | sha256sum | cut -d' ' -f1)
echo "CA_HASH=sha256:$hash" > vagrant/.join.env
echo "vagrant/bin: $(ls vagrant/bin | tr '\n' ' '); CA_HASH=sha256:$hash"
