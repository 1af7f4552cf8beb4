"""``devmodel qemu`` and ``devmodel image``: fetch or build what a guest boot needs, report it."""

from __future__ import annotations

import argparse

from images.accel import choose_accel
from images.initramfs import build
from images.kernel import find_kernel
from images.qemu import describe, qemu_argv


def cmd_qemu(args: argparse.Namespace) -> int:
    """Find (or bootstrap) a vfio-user capable QEMU and print it."""
    argv = qemu_argv()
    print(f"qemu: {describe()}")
    print(f"accelerator: {choose_accel()}")
    if args.argv:
        print(" ".join(argv))
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    """Build (or reuse) the guest kernel and initramfs and print their paths."""
    kernel = find_kernel()
    initrd = build(kernel)
    print(f"kernel: {kernel.image} ({kernel.release or 'user kernel'})")
    print(f"initramfs: {initrd} ({initrd.stat().st_size // 1024} KiB)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qemu", help="find or bootstrap QEMU >= 10.1 with vfio-user-pci")
    p.add_argument("--argv", action="store_true", help="print the argv prefix used to launch it")
    p.set_defaults(func=cmd_qemu)
    p = sub.add_parser("image", help="build the guest kernel and initramfs (cached)")
    p.set_defaults(func=cmd_image)
