/* The guest's end of QEMU's user-mode network (net.c, docs/network.md). */
#pragma once

/* Kernel parameter sm.net=MODE: "user" configures eth0 for QEMU's user-mode network. */
void sm_net_setup(const char *mode);
