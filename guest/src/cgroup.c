/* Every process tree the agent starts (an exec, the workload) lives in a cgroup of its own under
 * /sys/fs/cgroup/sm, so that
 *   - a tree is ended whole (cgroup.kill), even the processes that left its process group;
 *   - the guest's processes together stay below the limits that keep the agent serving: fewer
 *     processes than the kernel's thread limit, less memory than the guest has, and a CPU share
 *     that leaves the agent (in the root cgroup) its turn under a fork bomb.
 * Without cgroup2 (host mode, a kernel without it) every call here does nothing and the callers
 * fall back on process groups. */
#define _GNU_SOURCE
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define ROOT "/sys/fs/cgroup"
#define PARENT ROOT "/sm"
#define RESERVED_TASKS 128           /* tasks left to the agent and the kernel */
#define RESERVED_MEMORY (16ull << 20) /* memory left to the agent and the kernel */
#define MAX_LEFTOVERS 1024           /* trees whose cgroup outlived them, removed once empty */

static int enabled;
static uint32_t next_id = 1;
static uint32_t leftovers[MAX_LEFTOVERS];
static int nleftovers;

static int write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	ssize_t n = write(fd, text, strlen(text));
	int e = n < 0 ? errno : 0;
	close(fd);
	return -e;
}

static uint64_t read_u64(const char *path, const char *key)
{
	char buf[4096];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	const char *at = key ? strstr(buf, key) : buf;
	if (!at)
		return 0;
	if (key)
		at += strlen(key);
	return strtoull(at, NULL, 10);
}

void sm_cgroup_init(void)
{
	if (A.host_mode)
		return;
	int e = write_file(ROOT "/cgroup.subtree_control", "+cpu +memory +pids");
	if (e < 0) {
		sm_dbg("cgroups: controllers not enabled (%s); process groups only", strerror(-e));
		return;
	}
	if (mkdir(PARENT, 0755) < 0 && errno != EEXIST) {
		sm_dbg("cgroups: %s: %s", PARENT, strerror(errno));
		return;
	}
	uint64_t tasks = read_u64("/proc/sys/kernel/threads-max", NULL);
	uint64_t pids = read_u64("/proc/sys/kernel/pid_max", NULL);
	if (pids && (!tasks || pids < tasks))
		tasks = pids;
	char num[32];
	if (tasks > 2 * RESERVED_TASKS) {
		snprintf(num, sizeof num, "%llu", (unsigned long long)(tasks - RESERVED_TASKS));
		write_file(PARENT "/pids.max", num);
	}
	uint64_t mem = read_u64("/proc/meminfo", "MemTotal:") * 1024;
	if (mem > 4 * RESERVED_MEMORY) {
		snprintf(num, sizeof num, "%llu", (unsigned long long)(mem - RESERVED_MEMORY));
		write_file(PARENT "/memory.max", num);
	}
	enabled = 1;
}

int sm_cgroup_freeze(int frozen)
{
	if (!enabled)
		return 0;
	return write_file(PARENT "/cgroup.freeze", frozen ? "1" : "0");
}

static void path_of(char *out, size_t n, uint32_t id, const char *file)
{
	snprintf(out, n, PARENT "/%u%s%s", id, file ? "/" : "", file ? file : "");
}

static int try_remove(uint32_t id)
{
	char path[96];
	path_of(path, sizeof path, id, NULL);
	return rmdir(path) == 0 || errno == ENOENT;
}

int sm_cgroup_new(uint32_t *id)
{
	*id = 0;
	if (!enabled)
		return 0;
	for (int i = 0; i < nleftovers;) {
		if (try_remove(leftovers[i]))
			leftovers[i] = leftovers[--nleftovers];
		else
			i++;
	}
	char path[96];
	uint32_t n = next_id++;
	if (!next_id)
		next_id = 1;
	path_of(path, sizeof path, n, NULL);
	if (mkdir(path, 0755) < 0 && errno != EEXIST)
		return -errno;
	*id = n;
	return 0;
}

int sm_cgroup_procs(uint32_t id)
{
	if (!id)
		return -1;
	char path[96];
	path_of(path, sizeof path, id, "cgroup.procs");
	return open(path, O_WRONLY | O_CLOEXEC);
}

void sm_cgroup_kill(uint32_t id)
{
	if (!id)
		return;
	char path[96];
	path_of(path, sizeof path, id, "cgroup.kill");
	write_file(path, "1");
}

void sm_cgroup_release(uint32_t id)
{
	if (!id || try_remove(id))
		return;
	if (nleftovers < MAX_LEFTOVERS)
		leftovers[nleftovers++] = id;
}

void sm_kill_tree(pid_t pgid, uint32_t cgroup, int sig)
{
	if (sig == SIGKILL && cgroup)
		sm_cgroup_kill(cgroup);
	sm_kill_group(pgid, sig);
}
