#!/bin/sh
# Every VM: what kubeadm's preflight and pod networking need from the kernel (modules, sysctls, no swap).
set -eu
modprobe overlay
modprobe br_netfilter
printf 'overlay\nbr_netfilter\n' > /etc/modules-load.d/k8s.conf
cat > /etc/sysctl.d/k8s.conf <<CONF
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
CONF
sysctl --system >/dev/null
swapoff -a
sed -i '/\sswap\s/d' /etc/fstab
