/* The mount relay: a process of its own that serves the sm.mounts port (docs/protocol.md, "Mounts
 * channel"). It carries each mount's 9P bytes between a socketpair, whose other end the guest
 * kernel's 9p client uses (trans=fd), and MOUNT_DATA frames to the host's 9P server. */
#ifndef SM_MOUNT_H
#define SM_MOUNT_H

#include <stddef.h>
#include <stdint.h>

#define SM_MOUNT_PORT "sm.mounts"
#define SM_MOUNT_PROTO_VERSION 1u
/* Credit the relay gives the host for MOUNT_DATA of each new mount, before any WINDOW. */
#define SM_MOUNT_WINDOW 1048576u
/* Mounts open at once in one session. */
#define SM_MOUNT_MAX 64u

enum sm_mount_type {
	SM_MOUNT = 0x40,
	SM_MOUNTED = 0x41,
	SM_MOUNT_DATA = 0x42,
	SM_UNMOUNT = 0x43,
};

/* mount-proto.c: names, directions and payload checks of the mounts channel's messages. */
const char *sm_mount_type_name(unsigned type); /* NULL for a type that is not a mount type */
int sm_mount_type_from_host(unsigned type);
int sm_mount_type_from_guest(unsigned type);
int sm_mount_msg_check(unsigned type, int from_host, const uint8_t *p, size_t n, char *err, size_t errlen);

/* In the VM: fork the relay (after the switch into the image root). It waits for the port to
 * appear and serves it; `close_fds` (-1 terminated) are the agent's descriptors it must not keep. */
void sm_mount_relay_start(const int *close_fds, int debug);
/* SIGKILL the mount relay (at shutdown: it ignores SIGTERM). */
void sm_mount_relay_stop(void);

/* Serve the mounts protocol on `chan_fd` until the channel ends (host mode) or forever (VM).
 * Host mode: MOUNT runs `mount_exec` (argv: path msize readOnly, the 9P socket as fd 3) instead
 * of mount(2), and UNMOUNT unmounts nothing. */
int sm_mount_relay_run(int chan_fd, int host_mode, const char *mount_exec, int debug);

#endif
