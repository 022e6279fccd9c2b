/* PID 1 in the VM: mount the basics, find the root disk and the agent port, switch into the image's
 * root filesystem, then serve the protocol. Also shutdown and power-off. */
#define _GNU_SOURCE
#include "agent.h"
#include "mount.h"
#include "net.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define WAIT_DEVICE_MS 20000

static struct {
	char root[256];
	char rootfstype[64];
	char rootflags[512];
	char hostname[65];
	char port[128];
	char net[16];
	int debug;
} P = { "/dev/vda", "ext4", "", "", "sm.agent", "", 0 };

static void __attribute__((noreturn)) fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

void sm_poweroff(void)
{
	sync();
	tcdrain(2);
	/* The microvm has no ACPI: power-off would only halt. Restart instead; the kernel runs with
	 * reboot=t (triple fault) and QEMU with -no-reboot, so QEMU exits. */
	reboot(RB_AUTOBOOT);
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

static void fatal(const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	sm_log("FATAL: %s; powering off", msg);
	sm_poweroff();
}

static long boot_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000 };
	nanosleep(&ts, NULL);
}

static void mkdir_quiet(const char *path, mode_t mode)
{
	if (mkdir(path, mode) < 0 && errno != EEXIST)
		sm_log("mkdir %s: %s", path, strerror(errno));
}

static void must_mount(const char *src, const char *dst, const char *type, unsigned long flags, const char *data)
{
	if (mount(src, dst, type, flags, data) < 0)
		fatal("mount %s on %s (%s): %s", src, dst, type ? type : "-", strerror(errno));
}

static void set_param(char *dst, size_t cap, const char *val, const char *name)
{
	if (strlen(val) >= cap)
		fatal("kernel parameter %s is too long", name);
	memcpy(dst, val, strlen(val) + 1);
}

static void parse_cmdline(void)
{
	char buf[4096];
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		fatal("open /proc/cmdline: %s", strerror(errno));
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n < 0)
		n = 0;
	buf[n] = 0;
	char *save = NULL;
	for (char *tok = strtok_r(buf, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
		if (strncmp(tok, "sm.", 3) != 0)
			continue;
		char *eq = strchr(tok, '=');
		if (!eq)
			continue;
		*eq = 0;
		const char *k = tok + 3, *v = eq + 1;
		if (!strcmp(k, "root"))
			set_param(P.root, sizeof P.root, v, tok);
		else if (!strcmp(k, "rootfstype"))
			set_param(P.rootfstype, sizeof P.rootfstype, v, tok);
		else if (!strcmp(k, "rootflags"))
			set_param(P.rootflags, sizeof P.rootflags, v, tok);
		else if (!strcmp(k, "hostname"))
			set_param(P.hostname, sizeof P.hostname, v, tok);
		else if (!strcmp(k, "port"))
			set_param(P.port, sizeof P.port, v, tok);
		else if (!strcmp(k, "net"))
			set_param(P.net, sizeof P.net, v, tok);
		else if (!strcmp(k, "debug"))
			P.debug = !strcmp(v, "1");
		else
			sm_log("unknown kernel parameter %s ignored", tok);
	}
}

static int read_line(const char *path, char *out, size_t cap)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, out, cap - 1);
	close(fd);
	if (n < 0)
		return -1;
	out[n] = 0;
	while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == ' '))
		out[--n] = 0;
	return 0;
}

/* sm.root=serial:NAME → the virtio-blk disk whose serial is NAME (/dev/vdX in probe order otherwise). */
static int find_root(char *dev, size_t cap)
{
	if (strncmp(P.root, "serial:", 7) != 0) {
		snprintf(dev, cap, "%s", P.root);
		return access(dev, F_OK) == 0 ? 0 : -1;
	}
	DIR *d = opendir("/sys/block");
	if (!d)
		return -1;
	struct dirent *e;
	int found = -1;
	while ((e = readdir(d))) {
		char path[300], serial[128];
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/sys/block/%s/serial", e->d_name);
		if (read_line(path, serial, sizeof serial) == 0 && !strcmp(serial, P.root + 7)) {
			snprintf(dev, cap, "/dev/%s", e->d_name);
			found = access(dev, F_OK) == 0 ? 0 : -1;
			break;
		}
	}
	closedir(d);
	return found;
}

/* The virtio-serial port named P.port: /sys/class/virtio-ports/vportXpY/name. */
static int open_port(void)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	if (!d)
		return -1;
	struct dirent *e;
	int fd = -1;
	while ((e = readdir(d))) {
		char path[300], name[160];
		if (strncmp(e->d_name, "vport", 5) != 0)
			continue;
		snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
		if (read_line(path, name, sizeof name) < 0 || strcmp(name, P.port) != 0)
			continue;
		snprintf(path, sizeof path, "/dev/%s", e->d_name);
		fd = open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
		break;
	}
	closedir(d);
	return fd;
}

static void symlink_quiet(const char *target, const char *path)
{
	if (symlink(target, path) < 0 && errno != EEXIST)
		sm_log("symlink %s: %s", path, strerror(errno));
}

static void lo_up(void)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		sm_log("loopback: socket: %s", strerror(errno));
		return;
	}
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	memcpy(ifr.ifr_name, "lo", 3);
	if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
		ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
		if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
			sm_log("loopback: SIOCSIFFLAGS: %s", strerror(errno));
	} else {
		sm_log("loopback: SIOCGIFFLAGS: %s", strerror(errno));
	}
	close(s);
}

static void setup_console(void)
{
	int fd = open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd < 0)
		return;
	for (int i = 0; i < 3; i++)
		if (fd != i)
			dup2(fd, i);
	if (fd > 2)
		close(fd);
}

int sm_init_main(void)
{
	umask(022);
	mkdir_quiet("/dev", 0755);
	mkdir_quiet("/proc", 0555);
	mkdir_quiet("/sys", 0555);
	mkdir_quiet("/mnt", 0755);
	if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") < 0 && errno != EBUSY) {
		setup_console();
		fatal("mount devtmpfs on /dev: %s", strerror(errno));
	}
	setup_console();
	must_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	must_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	parse_cmdline();
	A.debug = P.debug;
	long t_start = boot_ms();
	sm_dbg("root=%s rootfstype=%s rootflags=%s hostname=%s port=%s", P.root, P.rootfstype, P.rootflags,
	       P.hostname, P.port);

	/* Devices show up as their drivers probe: wait for the disk and the port (bounded). */
	char root[300];
	int port = -1, have_root = 0;
	for (int waited = 0, step = 1;; waited += step, step = step < 16 ? step * 2 : 16) {
		if (!have_root)
			have_root = find_root(root, sizeof root) == 0;
		if (port < 0)
			port = open_port();
		if (have_root && port >= 0)
			break;
		if (waited >= WAIT_DEVICE_MS) {
			if (!have_root)
				fatal("root device %s did not appear within %d ms", P.root, WAIT_DEVICE_MS);
			fatal("virtio-serial port %s did not appear within %d ms", P.port, WAIT_DEVICE_MS);
		}
		sleep_ms(step);
	}
	sm_dbg("root device %s and agent port ready after %ld ms (boot time %ld ms)", root, boot_ms() - t_start,
	       boot_ms());

	/* sm.rootflags: mount(8)-style; the generic flags become MS_* bits, the rest is the data string */
	static const struct {
		const char *name;
		unsigned long flag;
	} generic[] = { { "ro", MS_RDONLY },   { "rw", 0 },		{ "noatime", MS_NOATIME },
			{ "relatime", MS_RELATIME }, { "nodev", MS_NODEV },	{ "nosuid", MS_NOSUID },
			{ "noexec", MS_NOEXEC },     { "sync", MS_SYNCHRONOUS }, { "lazytime", MS_LAZYTIME } };
	unsigned long flags = 0;
	char data[sizeof P.rootflags] = "", *save = NULL;
	for (char *tok = strtok_r(P.rootflags, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		size_t i;
		for (i = 0; i < sizeof generic / sizeof generic[0] && strcmp(tok, generic[i].name); i++)
			;
		if (i < sizeof generic / sizeof generic[0]) {
			flags |= generic[i].flag;
		} else {
			if (*data)
				strcat(data, ",");
			strcat(data, tok);
		}
	}
	must_mount(root, "/mnt", P.rootfstype, flags, *data ? data : NULL);
	mkdir_quiet("/mnt/dev", 0755);
	mkdir_quiet("/mnt/proc", 0555);
	mkdir_quiet("/mnt/sys", 0555);
	must_mount("/dev", "/mnt/dev", NULL, MS_MOVE, NULL);
	must_mount("/proc", "/mnt/proc", NULL, MS_MOVE, NULL);
	must_mount("/sys", "/mnt/sys", NULL, MS_MOVE, NULL);
	mkdir_quiet("/mnt/dev/pts", 0755);
	must_mount("devpts", "/mnt/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5");
	unlink("/mnt/dev/ptmx");
	symlink_quiet("pts/ptmx", "/mnt/dev/ptmx");
	mkdir_quiet("/mnt/dev/shm", 01777);
	must_mount("shm", "/mnt/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	if (mount("cgroup2", "/mnt/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		sm_dbg("cgroup2 not mounted: %s", strerror(errno));
	symlink_quiet("/proc/self/fd", "/mnt/dev/fd");
	symlink_quiet("/proc/self/fd/0", "/mnt/dev/stdin");
	symlink_quiet("/proc/self/fd/1", "/mnt/dev/stdout");
	symlink_quiet("/proc/self/fd/2", "/mnt/dev/stderr");
	symlink_quiet("/proc/kcore", "/mnt/dev/core");

	if (chdir("/mnt") < 0)
		fatal("chdir /mnt: %s", strerror(errno));
	must_mount(".", "/", NULL, MS_MOVE, NULL);
	if (chroot(".") < 0 || chdir("/") < 0)
		fatal("chroot into the root filesystem: %s", strerror(errno));

	sm_runtime_setup(P.hostname);
	lo_up();
	if (*P.net)
		sm_net_setup(P.net);
	A.urandom = open("/dev/urandom", O_RDWR | O_CLOEXEC);
	setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);

	/* Mounts are served by a process of their own (mount.c): it must never wait on this loop. */
	const int relay_closes[] = { port, A.urandom, -1 };
	sm_mount_relay_start(relay_closes, P.debug);

	sm_dbg("serving the host from boot time %ld ms", boot_ms());
	sm_agent_run(port, 0, P.debug);
	fatal("the agent loop ended");
}

/* SHUTDOWN in the VM: TERM everything, wait up to 2 s, KILL the rest, sync, unmount, root read-only. */
void sm_shutdown_vm(void)
{
	/* The mount relay ignores SIGTERM (a guest's kill -1 must not take the mounts down): it ends
	 * first, at once, so that only the guest's own processes get their 2 s. */
	sm_mount_relay_stop();
	kill(-1, SIGTERM);
	for (int waited = 0; waited < 2000; waited += 10) {
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
		if (waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD)
			break;
		sleep_ms(10);
	}
	kill(-1, SIGKILL);
	for (int waited = 0; waited < 1000; waited += 5) {
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
		if (waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD)
			break;
		sleep_ms(5);
	}
	sync();
	/* unmount everything but the root, deepest first */
	char *buf = malloc(65536);
	if (buf) {
		int fd = open("/proc/self/mounts", O_RDONLY | O_CLOEXEC);
		ssize_t n = fd >= 0 ? read(fd, buf, 65535) : -1;
		if (fd >= 0)
			close(fd);
		if (n > 0) {
			buf[n] = 0;
			char *lines[512];
			int nl = 0;
			for (char *l = buf; *l && nl < 512;) {
				char *e = strchr(l, '\n');
				if (e)
					*e = 0;
				lines[nl++] = l;
				if (!e)
					break;
				l = e + 1;
			}
			for (int i = nl - 1; i >= 0; i--) {
				char *sp = strchr(lines[i], ' ');
				if (!sp)
					continue;
				char *target = sp + 1;
				char *end = strchr(target, ' ');
				if (end)
					*end = 0;
				if (!strcmp(target, "/") || !strcmp(target, "/dev") || !strcmp(target, "/proc") ||
				    !strcmp(target, "/sys"))
					continue;
				umount2(target, 0);
			}
		}
		free(buf);
	}
	if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL) < 0)
		sm_log("remounting / read-only: %s", strerror(errno));
	sync();
}
