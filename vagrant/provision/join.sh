#!/bin/sh
# `kubeadm join` with nodelet as the kubelet: the command the README documents. Reads
#   API_SERVER  host:port of the API server        TOKEN     a bootstrap token
#   CA_HASH     sha256:<hex> of the cluster CA's public key (or JOIN_ENV, a file setting it)
#   NODE_NAME   default: the host name              NODE_IP   the node's address (nodelet's --node-ip)
#   EXTRA_IGNORES  more preflight checks to ignore (the test bed's sandbox)
# Only CRI and ContainerRuntimeVersion are ignored by default: nodelet has no CRI socket (its runtime is
# built in), which is all those two checks look for.
set -eu
if [ -n "${JOIN_ENV:-}" ] && [ -f "$JOIN_ENV" ]; then . "$JOIN_ENV"; fi
: "${API_SERVER:?}" "${TOKEN:?}" "${CA_HASH:?}"
if [ -n "${NODE_IP:-}" ]; then
  mkdir -p /etc/default
  grep -qs -- "--node-ip" /etc/default/kubelet || echo "KUBELET_EXTRA_ARGS=--node-ip=$NODE_IP" >> /etc/default/kubelet
fi
ignores=CRI,ContainerRuntimeVersion${EXTRA_IGNORES:+,$EXTRA_IGNORES}
exec kubeadm join "$API_SERVER" --token "$TOKEN" --discovery-token-ca-cert-hash "$CA_HASH" \
  --node-name "${NODE_NAME:-$(hostname)}" --ignore-preflight-errors="$ignores"
