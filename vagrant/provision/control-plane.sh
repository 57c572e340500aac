#!/bin/sh
# The control-plane VM: containerd from Debian, kubeadm, kubelet and kubectl from the Kubernetes packages
# (pkgs.k8s.io, K8S_MINOR), then `kubeadm init` with a fixed bootstrap token and the CA prepare.sh made (so
# the workers know its hash from vagrant/.join.env).
set -eu
: "${CONTROL_PLANE_IP:?}" "${TOKEN:?}" "${K8S_MINOR:=v1.37}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q containerd apt-transport-https ca-certificates curl gpg
mkdir -p /etc/containerd
containerd config default | sed 's/SystemdCgroup = false/SystemdCgroup = true/' > /etc/containerd/config.toml
systemctl restart containerd
mkdir -p /etc/apt/keyrings
curl -fsSL "https://pkgs.k8s.io/core:/stable:/$K8S_MINOR/deb/Release.key" | gpg --dearmor --yes -o /etc/apt/keyrings/kubernetes.gpg
echo "deb [signed-by=/etc/apt/keyrings/kubernetes.gpg] https://pkgs.k8s.io/core:/stable:/$K8S_MINOR/deb/ /" > /etc/apt/sources.list.d/kubernetes.list
apt-get update -q
apt-get install -y -q kubelet kubeadm kubectl
install -D -m 0644 /nodelet/vagrant/.pki/ca.crt /etc/kubernetes/pki/ca.crt
install -D -m 0600 /nodelet/vagrant/.pki/ca.key /etc/kubernetes/pki/ca.key
kubeadm init --apiserver-advertise-address "$CONTROL_PLANE_IP" --token "$TOKEN" --token-ttl 0 \
  --pod-network-cidr 10.244.0.0/16
mkdir -p /root/.kube && cp /etc/kubernetes/admin.conf /root/.kube/config
echo "control plane up: vagrant ssh control-plane -c 'sudo kubectl get nodes'"
