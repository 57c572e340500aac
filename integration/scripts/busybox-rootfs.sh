# Sourced by build-images.sh and examples/run-standalone.sh: busybox_rootfs DIR writes a busybox root filesystem
# (Debian's busybox-static with every applet linked, root and nobody users) into DIR.
busybox_rootfs() {
  local r=$1
  mkdir -p "$r"/{bin,etc,tmp,root,proc,sys,dev,var/run}
  chmod 1777 "$r/tmp"
  cp /bin/busybox "$r/bin/busybox"
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$r/bin/$a"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$r/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$r/etc/group"
}
