/* sm-init: PID 1 and protocol agent of a supermachine guest (see docs/agent.md).
 *
 *   sm-init                       as PID 1 in the VM: boot, then serve the port sm.port
 *   sm-init --channel-fd N        serve an inherited socket (host mode: no mounts, no chroot)
 *   sm-init --channel PATH        serve a device or socket opened by path (host mode)
 *   --debug                       log every frame to stderr
 *   --mount-relay                 serve the mounts protocol instead of the agent's (host mode; with
 *   --mount-exec PROG             MOUNT runs PROG path msize readOnly with the 9P socket as fd 3)
 */
#include "agent.h"
#include "mount.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int usage(void)
{
	static const char text[] = "usage: sm-init [--debug] [--mount-relay [--mount-exec PROG]] (--channel-fd N | --channel PATH)\n"
				   "       (as PID 1 it boots the VM and serves the sm.port virtio-serial port)\n";
	ssize_t w = write(2, text, sizeof text - 1);
	(void)w;
	return 2;
}

static int open_path(const char *path)
{
	int fd = open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
	if (fd >= 0 || errno != ENXIO)
		return fd;
	/* a unix socket: connect to it */
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof sa.sun_path) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		close(fd);
		fd = -1;
	}
	return fd;
}

int main(int argc, char **argv)
{
	int fd = -1, debug = 0, relay = 0;
	const char *path = NULL, *mount_exec = NULL;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--debug")) {
			debug = 1;
		} else if (!strcmp(argv[i], "--mount-relay")) {
			relay = 1;
		} else if (!strcmp(argv[i], "--mount-exec") && i + 1 < argc) {
			mount_exec = argv[++i];
		} else if (!strcmp(argv[i], "--channel-fd") && i + 1 < argc) {
			char *end;
			long v = strtol(argv[++i], &end, 10);
			if (*end || v < 0 || v > 1 << 20)
				return usage();
			fd = (int)v;
		} else if (!strcmp(argv[i], "--channel") && i + 1 < argc) {
			path = argv[++i];
		} else if (getpid() == 1) {
			continue; /* the kernel passes unknown cmdline words to init */
		} else {
			return usage();
		}
	}
	if (fd < 0 && !path) {
		if (getpid() == 1)
			return sm_init_main();
		return usage();
	}
	/* Make sure 0, 1, 2 are open so that no channel or pipe lands on them. */
	for (int i = 0; i < 3; i++) {
		if (fcntl(i, F_GETFD) < 0) {
			int n = open("/dev/null", O_RDWR);
			if (n >= 0 && n != i)
				close(n);
		}
	}
	if (path) {
		fd = open_path(path);
		if (fd < 0) {
			sm_log("cannot open %s: %s", path, strerror(errno));
			return 1;
		}
	} else if (fcntl(fd, F_GETFD) < 0) {
		sm_log("--channel-fd %d: %s", fd, strerror(errno));
		return 1;
	}
	if (relay)
		return sm_mount_relay_run(fd, 1, mount_exec, debug);
	return sm_agent_run(fd, 1, debug);
}
