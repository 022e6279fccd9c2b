/* The runtime environment docker gives every container, made in the VM once the image's root
 * filesystem is the root (docs/agent.md, "The guest's runtime environment"): the hostname and
 * /etc/hostname, /etc/hosts and /etc/machine-id as files mounted over the image's (docker
 * bind-mounts its own the same way), /etc/resolv.conf when the image has none, /run and
 * /dev/mqueue, and docker's open-files limit. Server images and their entrypoint scripts expect these; none of it
 * may stop the boot: a failure is logged on the console and the rest goes on. */
#define _GNU_SOURCE
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

/* docker's default (containerd's LimitNOFILE=infinity on most hosts): also the kernel's nr_open */
#define NOFILE_LIMIT 1048576
#define DEFAULT_HOSTNAME "supermachine"
/* an /etc/hosts larger than this is not one the VM's names are kept in */
#define HOSTS_MAX 65536
/* where the names' tmpfs is mounted while its files are bound over /etc's; gone afterwards */
#define NAMES_DIR "/dev/.sm-names"
/* the files a clone rewrites with its own names: in memory, not in the ext4 root */
static const char *const NAME_FILES[] = { "/etc/hostname", "/etc/hosts", "/etc/machine-id" };

/* Writes a small file the way docker's bind mounts replace it: whatever the image has at that
 * path (a file, a symlink, even a dangling one) gives way; a directory there is left alone. */
static void put_file(const char *path, const char *text)
{
	for (int attempt = 0; attempt < 2; attempt++) {
		int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
		if (fd < 0) {
			if (attempt == 0 && errno == ELOOP && unlink(path) == 0)
				continue;
			sm_log("runtime: %s: %s", path, strerror(errno));
			return;
		}
		size_t n = strlen(text), done = 0;
		while (done < n) {
			ssize_t w = write(fd, text + done, n - done);
			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0) {
				sm_log("runtime: writing %s: %s", path, w < 0 ? strerror(errno) : "short write");
				break;
			}
			done += (size_t)w;
		}
		/* the image may have it with another owner or mode */
		if (fchown(fd, 0, 0) < 0 || fchmod(fd, 0644) < 0)
			sm_log("runtime: %s: %s", path, strerror(errno));
		close(fd);
		return;
	}
}

/* A directory the image may lack: created 0755 root, as docker's runtime makes mount points. */
static int ensure_dir(const char *path)
{
	struct stat st;
	if (stat(path, &st) == 0) {
		if (S_ISDIR(st.st_mode))
			return 0;
		sm_log("runtime: %s is not a directory", path);
		return -1;
	}
	if (mkdir(path, 0755) < 0 && errno != EEXIST) {
		sm_log("runtime: mkdir %s: %s", path, strerror(errno));
		return -1;
	}
	return 0;
}

/* docker's /etc/hosts, with the hostname on a loopback address (the VM may have no NIC) */
static void write_hosts(const char *name)
{
	char text[512];
	snprintf(text, sizeof text,
		 "127.0.0.1\tlocalhost\n"
		 "::1\tlocalhost ip6-localhost ip6-loopback\n"
		 "fe00::0\tip6-localnet\n"
		 "ff00::0\tip6-mcastprefix\n"
		 "ff02::1\tip6-allnodes\n"
		 "ff02::2\tip6-allrouters\n"
		 "127.0.1.1\t%s\n",
		 name);
	put_file("/etc/hosts", text);
}

static void set_hostname(const char *name)
{
	if (sethostname(name, strlen(name)) < 0)
		sm_log("runtime: sethostname %s: %s", name, strerror(errno));
	if (ensure_dir("/etc") < 0)
		return;
	char text[80];
	snprintf(text, sizeof text, "%s\n", name);
	put_file("/etc/hostname", text);
}

/* A new hostname in an /etc/hosts that may hold more than ours (the host's network block, the
 * workload's own lines): the 127.0.1.1 line names it, everything else stays. */
static void rename_in_hosts(const char *name)
{
	static char old[HOSTS_MAX + 1], out[HOSTS_MAX + 128];
	int fd = open("/etc/hosts", O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	ssize_t n = fd < 0 ? -1 : read(fd, old, sizeof old);
	if (fd >= 0)
		close(fd);
	if (n < 0 || n > HOSTS_MAX) {
		write_hosts(name); /* none, not a file, or too large to be ours: docker's again */
		return;
	}
	old[n] = 0;
	size_t o = 0;
	int named = 0;
	for (char *line = old; *line;) {
		char *end = strchr(line, '\n');
		size_t len = end ? (size_t)(end - line) + 1 : strlen(line);
		if (!strncmp(line, "127.0.1.1", 9) && (line[9] == ' ' || line[9] == '\t')) {
			if (!named)
				o += (size_t)snprintf(out + o, sizeof out - o, "127.0.1.1\t%s\n", name);
			named = 1;
		} else {
			memcpy(out + o, line, len);
			o += len;
		}
		line += len;
	}
	if (!named)
		snprintf(out + o, sizeof out - o, "%s127.0.1.1\t%s\n", o > 0 && out[o - 1] != '\n' ? "\n" : "", name);
	else
		out[o] = 0;
	put_file("/etc/hosts", out);
}

static void setup_names(const char *hostname)
{
	const char *name = hostname && *hostname ? hostname : DEFAULT_HOSTNAME;
	set_hostname(name);
	if (ensure_dir("/etc") < 0)
		return;
	write_hosts(name);
	/* Only when missing (or a dangling symlink). The C libraries ask 127.0.0.1 without one;
	 * written out, resolvers that insist on a nameserver line (dnspython) work the same way.
	 * With networking, the network setup writes its own. */
	struct stat st;
	if (stat("/etc/resolv.conf", &st) < 0 && errno == ENOENT)
		put_file("/etc/resolv.conf", "# supermachine: no resolver given; the C libraries' default\nnameserver 127.0.0.1\n");
}

/* Each of NAME_FILES becomes a file of a small tmpfs mounted over its path, as docker mounts its
 * own files over a container's: writes to it (the names of every clone of a snapshot, at its first
 * HELLO) go to memory instead of the ext4 root, where the first write after a restore cost 35-54 ms
 * under TCG (docs/benchmarks.md). As in docker, a rename over such a file fails (EBUSY); the file
 * API writes them in place (file.c). Whatever cannot be mounted stays a file of the root. */
static void mount_name_files(void)
{
	if (ensure_dir("/etc") < 0)
		return;
	if (mkdir(NAMES_DIR, 0700) < 0) {
		sm_log("runtime: mkdir %s: %s", NAMES_DIR, strerror(errno));
		return;
	}
	if (mount("sm-names", NAMES_DIR, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4m,nr_inodes=16,mode=0755") < 0) {
		sm_log("runtime: mount tmpfs on %s: %s", NAMES_DIR, strerror(errno));
		rmdir(NAMES_DIR);
		return;
	}
	for (size_t i = 0; i < sizeof NAME_FILES / sizeof *NAME_FILES; i++) {
		const char *path = NAME_FILES[i];
		char file[64];
		snprintf(file, sizeof file, "%s/%s", NAMES_DIR, strrchr(path, '/') + 1);
		int fd = open(file, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		if (fd >= 0)
			close(fd);
		/* The mount point: the image's file, else a new empty one. Whatever else the image
		 * has there (a symlink, even a dangling one) gives way, as in put_file; a directory stays. */
		struct stat st;
		if (lstat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
			if (S_ISDIR(st.st_mode)) {
				sm_log("runtime: %s is a directory", path);
				continue;
			}
			unlink(path);
		}
		/* read-only: an image's file can be mounted over on a read-only root too */
		fd = open(path, O_RDONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
		if (fd < 0 || mount(file, path, NULL, MS_BIND, NULL) < 0)
			sm_log("runtime: mounting a file of its own over %s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
	}
	if (umount2(NAMES_DIR, MNT_DETACH) < 0 || rmdir(NAMES_DIR) < 0)
		sm_log("runtime: removing %s: %s", NAMES_DIR, strerror(errno));
}

static void setup_mounts(void)
{
	/* /run: the image's own directory, as docker leaves it (a package's /run/postgresql or
	 * /run/lock must be there); created when the image has none */
	ensure_dir("/run");
	/* POSIX message queues, as docker mounts them */
	if (ensure_dir("/dev/mqueue") == 0 &&
	    mount("mqueue", "/dev/mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0 && errno != EBUSY)
		sm_log("runtime: mount mqueue on /dev/mqueue: %s", strerror(errno));
}

/* Every process the agent starts inherits this limit (docs/agent.md: "the agent's original
 * RLIMIT_NOFILE"); the kernel's default of 1024 is too low for servers. */
static void setup_limits(void)
{
	struct rlimit rl = { NOFILE_LIMIT, NOFILE_LIMIT };
	if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
		sm_log("runtime: RLIMIT_NOFILE %d: %s", NOFILE_LIMIT, strerror(errno));
}

void sm_runtime_setup(const char *hostname)
{
	setup_limits();
	setup_mounts();
	mount_name_files();
	setup_names(hostname);
}

void sm_runtime_identity(const char *hostname, const char *machine_id)
{
	static char last_id[33];
	if (hostname) {
		struct utsname u;
		if (uname(&u) < 0 || strcmp(u.nodename, hostname)) {
			set_hostname(hostname);
			rename_in_hosts(hostname);
		}
	}
	if (machine_id && strcmp(last_id, machine_id)) {
		char text[40];
		snprintf(text, sizeof text, "%s\n", machine_id);
		if (ensure_dir("/etc") == 0)
			put_file("/etc/machine-id", text);
		/* D-Bus's copy, when the image keeps one of its own rather than a link to /etc's */
		struct stat st;
		if (lstat("/var/lib/dbus/machine-id", &st) == 0 && S_ISREG(st.st_mode))
			put_file("/var/lib/dbus/machine-id", text);
		snprintf(last_id, sizeof last_id, "%s", machine_id);
	}
}
