#!/bin/busybox sh
# /init of nkp's tiny test guest: mount the pseudo file systems, load the virtio modules,
# run the agent (it reads its job from the kernel command line), power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null # the firmware's TPM event log
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
	insmod /lib/modules/$m.ko || echo "NKP-GUEST warning=insmod-$m-failed"
done
/bin/nkp-guest-agent
echo "NKP-GUEST poweroff=1"
poweroff -f
