/* Agent tests for the streams of protocol version 2: TCP tunnels, file-system operations, watches
 * and the workload, against `sm-init --channel-fd 3` in host mode (harness.c). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

/* ------------------------------------------------------------------------------------------------
 * Helpers.
 */

/* Expect ERROR on `stream` with `code` and (if errnum) that errno. */
static void expect_error(struct agent *a, uint32_t stream, uint32_t code, uint32_t errnum, const char *what)
{
	struct frame f;
	if (expect(a, &f, stream, SM_ERROR, 3000) == 0)
		CHECK(fu(&f, 1, 0) == code && (!errnum || fu(&f, 2, 0) == errnum), "%s: ERROR code %llu errno %llu",
		      what, (unsigned long long)fu(&f, 1, 0), (unsigned long long)fu(&f, 2, 0));
}

static void expect_ok(struct agent *a, uint32_t stream, const char *what)
{
	struct frame f;
	if (expect(a, &f, stream, SM_OK, 3000))
		fail("%s: no OK", what);
}

/* Read exactly n bytes from fd (blocking, bounded by a poll timeout). */
static ssize_t read_full(int fd, char *buf, size_t n, int timeout_ms)
{
	size_t got = 0;
	while (got < n) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		if (poll(&p, 1, timeout_ms) <= 0)
			break;
		ssize_t r = read(fd, buf + got, n - got);
		if (r <= 0)
			return r < 0 ? -1 : (ssize_t)got;
		got += (size_t)r;
	}
	return (ssize_t)got;
}

/* ------------------------------------------------------------------------------------------------
 * TCP tunnels.
 */

static int listener(uint16_t *port)
{
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t sl = sizeof sa;
	if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 8) < 0 ||
	    getsockname(ls, (struct sockaddr *)&sa, &sl) < 0) {
		fail("listen: %s", strerror(errno));
		return -1;
	}
	*port = ntohs(sa.sin_port);
	return ls;
}

static uint32_t tcp_connect(struct agent *a, const char *addr, uint16_t port, uint32_t window)
{
	uint32_t id = a->next_id++;
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	sm_put_u16(&b, 1, port);
	if (addr)
		sm_put_str(&b, 2, addr);
	if (window)
		sm_put_u32(&b, 3, window);
	send_buf(a, &b, id, SM_TCP_CONNECT);
	sm_buf_free(&b);
	return id;
}

void test_tcp(struct agent *a)
{
	current = "tcp: connect, data both ways, half-closes, OK";
	uint16_t port;
	int ls = listener(&port);
	if (ls < 0)
		return;
	uint32_t id = tcp_connect(a, NULL, port, 0);
	struct frame f;
	if (expect(a, &f, id, SM_TCP_CONNECTED, 3000))
		return;
	int peer = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
	CHECK(peer >= 0, "the agent connected to 127.0.0.1:%u", port);
	send_frame(a, id, SM_TCP_DATA, 0, "hello", 5);
	char buf[64] = "";
	CHECK(read_full(peer, buf, 5, 3000) == 5 && !memcmp(buf, "hello", 5), "the guest peer got the host's bytes");
	if (expect(a, &f, id, SM_WINDOW, 3000) == 0)
		CHECK(sm_be32(f.p) == 5, "the agent grants back what it wrote (%u)", sm_be32(f.p));
	CHECK(write(peer, "world", 5) == 5, "peer writes");
	if (expect(a, &f, id, SM_TCP_DATA, 3000) == 0)
		CHECK(f.h.length == 5 && !memcmp(f.p, "world", 5) && !(f.h.flags & SM_FLAG_FIN), "the peer's bytes arrive");
	send_frame(a, id, SM_TCP_DATA, SM_FLAG_FIN, NULL, 0);
	CHECK(read_full(peer, buf, 1, 3000) == 0, "the host's FIN is the peer's EOF (shutdown SHUT_WR)");
	CHECK(write(peer, "late", 4) == 4, "the other direction stays open");
	if (expect(a, &f, id, SM_TCP_DATA, 3000) == 0)
		CHECK(f.h.length == 4 && !memcmp(f.p, "late", 4), "half-open: data after the host's FIN");
	close(peer);
	if (expect(a, &f, id, SM_TCP_DATA, 3000) == 0)
		CHECK(f.h.length == 0 && (f.h.flags & SM_FLAG_FIN), "the peer's close is a FIN");
	expect_ok(a, id, "both directions done");

	current = "tcp: guest->host credit";
	id = tcp_connect(a, "127.0.0.1", port, 100 + SM_FRAME_COST);
	if (expect(a, &f, id, SM_TCP_CONNECTED, 3000))
		return;
	peer = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
	char big[1000];
	memset(big, 'z', sizeof big);
	CHECK(write(peer, big, sizeof big) == (ssize_t)sizeof big, "peer writes 1000 bytes");
	size_t got = 0;
	while (recv_frame(a, &f, 300) == 0) {
		CHECK(f.h.stream == id && f.h.type == SM_TCP_DATA, "only data for the tunnel");
		got += f.h.length;
	}
	CHECK(got == 100, "exactly the credit: 100 bytes (%zu)", got);
	send_window(a, id, 900 + 10 * SM_FRAME_COST);
	while (got < 1000 && recv_frame(a, &f, 3000) == 0)
		got += f.h.length;
	CHECK(got == 1000, "the rest once granted (%zu)", got);

	current = "tcp: RESET is an abortive close";
	send_frame(a, id, SM_RESET, 0, NULL, 0);
	ssize_t r = read_full(peer, buf, 1, 3000);
	CHECK(r < 0 && errno == ECONNRESET, "the peer sees ECONNRESET (%zd, %s)", r, strerror(errno));
	close(peer);

	current = "tcp: refused, bad address";
	close(ls);
	id = tcp_connect(a, NULL, port, 0);
	expect_error(a, id, SM_E_IO, ECONNREFUSED, "nothing listens");
	id = tcp_connect(a, "::1", port, 0);
	if (recv_frame(a, &f, 3000) == 0)
		CHECK(f.h.stream == id && f.h.type == SM_ERROR && fu(&f, 1, 0) == SM_E_IO, "IPv6 literal accepted, refused");
	id = tcp_connect(a, "localhost", port, 0);
	expect_error(a, id, SM_E_BAD_REQUEST, 0, "a host name is not an address");
	id = tcp_connect(a, NULL, 0, 0);
	expect_error(a, id, SM_E_BAD_REQUEST, 0, "port 0");
}

/* ------------------------------------------------------------------------------------------------
 * File-system operations.
 */

struct fsreq {
	uint8_t op;
	const char *path, *path2;
	int has_mode;
	uint32_t mode, flags, window;
	uint64_t size, mtime_ns;
};

static uint32_t send_fs(struct agent *a, const struct fsreq *q)
{
	uint32_t id = a->next_id++;
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	sm_put_u8(&b, 1, q->op);
	sm_put_str(&b, 2, q->path);
	if (q->path2)
		sm_put_str(&b, 3, q->path2);
	if (q->has_mode)
		sm_put_u32(&b, 4, q->mode);
	if (q->flags)
		sm_put_u32(&b, 5, q->flags);
	if (q->size)
		sm_put_u64(&b, 8, q->size);
	if (q->mtime_ns)
		sm_put_u64(&b, 10, q->mtime_ns);
	if (q->window)
		sm_put_u32(&b, 11, q->window);
	send_buf(a, &b, id, SM_FS);
	sm_buf_free(&b);
	return id;
}

enum { OP_STAT = 1, OP_READDIR, OP_MKDIR, OP_RM, OP_RENAME, OP_CHMOD, OP_CHOWN, OP_SYMLINK, OP_READLINK, OP_REALPATH,
       OP_TRUNCATE, OP_UTIMES, OP_ACCESS };

/* Run an FS op expected to succeed; copies OK's path (if any) into out. */
static void fs_ok(struct agent *a, const struct fsreq *q, char *out, size_t cap, const char *what)
{
	uint32_t id = send_fs(a, q);
	struct frame f;
	if (expect(a, &f, id, SM_OK, 3000)) {
		fail("%s", what);
		return;
	}
	if (out)
		fstr(&f, 2, out, cap);
}

static void touch(const char *path, const char *content)
{
	int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0644);
	if (fd >= 0) {
		ssize_t w = write(fd, content, strlen(content));
		(void)w;
		close(fd);
	}
}

void test_fs(struct agent *a)
{
	char root[300], p[1024], q[2048], out[4096];
	struct frame f;
	struct stat st;
	snprintf(root, sizeof root, "%s/fs", tmpdir);

	current = "fs: mkdir";
	snprintf(p, sizeof p, "%s/a/b/c", root);
	fs_ok(a, &(struct fsreq){ .op = OP_MKDIR, .path = p, .flags = 1 }, out, sizeof out, "mkdir -p");
	CHECK(!strcmp(out, root), "recursive mkdir answers the first directory it made ('%s')", out);
	CHECK(stat(p, &st) == 0 && S_ISDIR(st.st_mode), "the tree exists");
	fs_ok(a, &(struct fsreq){ .op = OP_MKDIR, .path = p, .flags = 1 }, out, sizeof out, "mkdir -p again");
	CHECK(out[0] == 0, "nothing made: no path");
	expect_error(a, send_fs(a, &(struct fsreq){ .op = OP_MKDIR, .path = p }), SM_E_IO, EEXIST, "mkdir of an existing dir");
	snprintf(q, sizeof q, "%s/file", root);
	touch(q, "0123456789");
	snprintf(p, sizeof p, "%s/file/sub", root);
	expect_error(a, send_fs(a, &(struct fsreq){ .op = OP_MKDIR, .path = p, .flags = 1 }), SM_E_IO, ENOTDIR,
		     "mkdir -p through a file");

	current = "fs: stat, lstat, symlink, readlink, realpath";
	uint32_t id = send_fs(a, &(struct fsreq){ .op = OP_STAT, .path = q });
	if (expect(a, &f, id, SM_STAT, 3000) == 0) {
		stat(q, &st);
		CHECK(fu(&f, 1, 0) == st.st_mode && fu(&f, 4, 0) == 10 && fu(&f, 8, 0) == st.st_ino &&
			      fu(&f, 6, 0) == (uint64_t)st.st_mtim.tv_sec * 1000000000u + (uint64_t)st.st_mtim.tv_nsec,
		      "STAT: mode, size, inode, mtime");
		expect_ok(a, id, "stat");
	}
	snprintf(p, sizeof p, "%s/link", root);
	fs_ok(a, &(struct fsreq){ .op = OP_SYMLINK, .path = p, .path2 = "file" }, NULL, 0, "symlink");
	id = send_fs(a, &(struct fsreq){ .op = OP_STAT, .path = p, .flags = 4 });
	if (expect(a, &f, id, SM_STAT, 3000) == 0) {
		CHECK(S_ISLNK(fu(&f, 1, 0)), "lstat reports the link itself");
		expect_ok(a, id, "lstat");
	}
	id = send_fs(a, &(struct fsreq){ .op = OP_STAT, .path = p });
	if (expect(a, &f, id, SM_STAT, 3000) == 0) {
		CHECK(S_ISREG(fu(&f, 1, 0)) && fu(&f, 4, 0) == 10, "stat follows it");
		expect_ok(a, id, "stat");
	}
	fs_ok(a, &(struct fsreq){ .op = OP_READLINK, .path = p }, out, sizeof out, "readlink");
	CHECK(!strcmp(out, "file"), "readlink: '%s'", out);
	fs_ok(a, &(struct fsreq){ .op = OP_REALPATH, .path = p }, out, sizeof out, "realpath");
	char real[PATH_MAX];
	CHECK(realpath(q, real) && !strcmp(out, real), "realpath: '%s'", out);
	snprintf(p, sizeof p, "%s/missing", root);
	expect_error(a, send_fs(a, &(struct fsreq){ .op = OP_STAT, .path = p }), SM_E_IO, ENOENT, "stat of nothing");
	expect_error(a, send_fs(a, &(struct fsreq){ .op = OP_ACCESS, .path = p }), SM_E_IO, ENOENT, "access of nothing");
	fs_ok(a, &(struct fsreq){ .op = OP_ACCESS, .path = q, .has_mode = 1, .mode = R_OK | W_OK }, NULL, 0, "access");

	current = "fs: chmod, truncate, utimes, rename";
	fs_ok(a, &(struct fsreq){ .op = OP_CHMOD, .path = q, .has_mode = 1, .mode = 0600 }, NULL, 0, "chmod");
	fs_ok(a, &(struct fsreq){ .op = OP_TRUNCATE, .path = q, .size = 3 }, NULL, 0, "truncate");
	fs_ok(a, &(struct fsreq){ .op = OP_UTIMES, .path = q, .mtime_ns = 1500000000123456789ull }, NULL, 0, "utimes");
	CHECK(stat(q, &st) == 0 && (st.st_mode & 07777) == 0600 && st.st_size == 3 && st.st_mtim.tv_sec == 1500000000 &&
		      st.st_mtim.tv_nsec == 123456789,
	      "mode 0600, size 3, mtime set to the ns");
	snprintf(p, sizeof p, "%s/renamed", root);
	fs_ok(a, &(struct fsreq){ .op = OP_RENAME, .path = q, .path2 = p }, NULL, 0, "rename");
	CHECK(access(p, F_OK) == 0 && access(q, F_OK) < 0, "renamed");
	expect_error(a, send_fs(a, &(struct fsreq){ .op = OP_CHMOD, .path = p }), SM_E_BAD_REQUEST, 0, "chmod without mode");
	expect_error(a, send_fs(a, &(struct fsreq){ .op = 99, .path = p }), SM_E_UNSUPPORTED, 0, "unknown operation");

	current = "fs: readdir in frames within the credit";
	snprintf(p, sizeof p, "%s/many", root);
	mkdir(p, 0755);
	for (int i = 0; i < 60; i++) {
		snprintf(q, sizeof q, "%s/entry-%02d-%s", p, i, i % 2 ? "with-a-longer-name" : "f");
		if (i == 7)
			mkdir(q, 0755);
		else
			touch(q, "");
	}
	id = send_fs(a, &(struct fsreq){ .op = OP_READDIR, .path = p, .window = SM_FRAME_COST + 600 });
	int entries = 0, frames = 0, dirs = 0, done = 0;
	while (!done && recv_frame(a, &f, 3000) == 0) {
		if (f.h.stream != id) {
			fail("readdir: a frame for stream %u", f.h.stream);
			break;
		}
		if (f.h.type == SM_OK) {
			done = 1;
			break;
		}
		if (f.h.type != SM_DIRENTS) {
			fail("readdir: unexpected %s", sm_type_name(f.h.type));
			break;
		}
		CHECK(f.h.length <= 600, "a DIRENTS frame within the credit (%u)", f.h.length);
		frames++;
		for (int i = 0; i < f.nf; i++) {
			struct sm_field g[4];
			int k = sm_fields_split(f.f[i].val, f.f[i].len, g, 4);
			entries++;
			dirs += k == 2 && sm_uval(&g[1]) == 4;
		}
		send_window(a, id, f.h.length + SM_FRAME_COST);
	}
	CHECK(done && entries == 60 && dirs == 1, "60 entries, one a directory (%d, %d)", entries, dirs);
	CHECK(frames > 3, "split over several frames (%d)", frames);
	expect_error(a, send_fs(a, &(struct fsreq){ .op = OP_READDIR, .path = "/nonexistent-dir" }), SM_E_IO, ENOENT,
		     "readdir of nothing");

	current = "fs: rm";
	expect_error(a, send_fs(a, &(struct fsreq){ .op = OP_RM, .path = p }), SM_E_IO, EISDIR, "rm of a dir without recursive");
	/* A symlink inside the tree to a directory outside it: removed, never followed. */
	char outside[400];
	snprintf(outside, sizeof outside, "%s/outside", tmpdir);
	mkdir(outside, 0755);
	snprintf(q, sizeof q, "%s/keep", outside);
	touch(q, "keep");
	snprintf(q, sizeof q, "%s/to-outside", p);
	CHECK(symlink(outside, q) == 0, "symlink to outside");
	fs_ok(a, &(struct fsreq){ .op = OP_RM, .path = root, .flags = 1 }, NULL, 0, "rm -r");
	CHECK(access(root, F_OK) < 0, "the tree is gone");
	snprintf(q, sizeof q, "%s/keep", outside);
	CHECK(access(q, F_OK) == 0, "the symlink's target survives");
	expect_error(a, send_fs(a, &(struct fsreq){ .op = OP_RM, .path = root }), SM_E_IO, ENOENT, "rm of nothing");
	fs_ok(a, &(struct fsreq){ .op = OP_RM, .path = root, .flags = 3 }, NULL, 0, "rm -f of nothing");
	snprintf(q, sizeof q, "%s/keep", outside);
	fs_ok(a, &(struct fsreq){ .op = OP_RM, .path = q }, NULL, 0, "rm of a file");
	snprintf(q, sizeof q, "%s/sub", outside);
	mkdir(q, 0755);
	touch(strcat(q, "/x"), "");
	expect_error(a, send_fs(a, &(struct fsreq){ .op = OP_RENAME, .path = outside, .path2 = "/" }), SM_E_IO, 0,
		     "rename onto / fails");
}

/* ------------------------------------------------------------------------------------------------
 * Watches.
 */

static uint32_t send_watch(struct agent *a, const char *path, int recursive, uint32_t window)
{
	uint32_t id = a->next_id++;
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	sm_put_str(&b, 1, path);
	if (recursive)
		sm_put_u8(&b, 2, 1);
	if (window)
		sm_put_u32(&b, 3, window);
	send_buf(a, &b, id, SM_WATCH);
	sm_buf_free(&b);
	return id;
}

/* The next WATCH_EVENT on `id`: returns its event code and copies its name, or -1. */
static int next_event(struct agent *a, uint32_t id, char *name, size_t cap, int timeout_ms)
{
	struct frame f;
	for (;;) {
		if (recv_frame(a, &f, timeout_ms))
			return -1;
		if (f.h.stream != id)
			continue;
		if (f.h.type == SM_OK)
			return 100;
		if (f.h.type != SM_WATCH_EVENT)
			return -2;
		fstr(&f, 2, name, cap);
		return (int)fu(&f, 1, 99);
	}
}

/* Wait for an event of kind `ev` named `want`, skipping others (modify events and the like). */
static int wait_event(struct agent *a, uint32_t id, int ev, const char *want)
{
	char name[4096];
	for (int i = 0; i < 32; i++) {
		int e = next_event(a, id, name, sizeof name, 3000);
		if (e < 0 || e == 100)
			return 0;
		if (e == ev && !strcmp(name, want))
			return 1;
	}
	return 0;
}

void test_watch(struct agent *a)
{
	char dir[300], p[1024], name[4096];
	snprintf(dir, sizeof dir, "%s/watched", tmpdir);
	mkdir(dir, 0755);

	current = "watch: recursive events";
	uint32_t id = send_watch(a, dir, 1, 0);
	CHECK(next_event(a, id, name, sizeof name, 3000) == 0, "ready first");
	snprintf(p, sizeof p, "%s/x", dir);
	touch(p, "1");
	CHECK(wait_event(a, id, 1, "x"), "create x");
	snprintf(p, sizeof p, "%s/sub", dir);
	mkdir(p, 0755);
	CHECK(wait_event(a, id, 1, "sub"), "create sub");
	snprintf(p, sizeof p, "%s/sub/y", dir);
	touch(p, "2");
	CHECK(wait_event(a, id, 1, "sub/y"), "create sub/y: the new directory is watched");
	char q[1024];
	snprintf(q, sizeof q, "%s/sub/z", dir);
	CHECK(rename(p, q) == 0, "rename");
	CHECK(wait_event(a, id, 4, "sub/y") && wait_event(a, id, 4, "sub/z"), "rename: old and new names");
	unlink(q);
	CHECK(wait_event(a, id, 3, "sub/z"), "delete sub/z");

	current = "watch: credit and overflow";
	char wdir[512];
	snprintf(wdir, sizeof wdir, "%s/small", tmpdir);
	mkdir(wdir, 0755);
	/* ready (an event field) costs 6 + 64; creating directory "a" (event, name, dir) 18 + 64 */
	uint32_t w2 = send_watch(a, wdir, 0, 6 + SM_FRAME_COST + 18 + SM_FRAME_COST);
	CHECK(next_event(a, w2, name, sizeof name, 3000) == 0, "ready");
	for (int i = 0; i < 3; i++) {
		snprintf(p, sizeof p, "%s/%c", wdir, 'a' + i);
		mkdir(p, 0755);
	}
	CHECK(next_event(a, w2, name, sizeof name, 3000) == 1 && !strcmp(name, "a"), "the first event within the credit");
	CHECK(next_event(a, w2, name, sizeof name, 300) == -1, "then nothing");
	send_window(a, w2, 4096);
	CHECK(next_event(a, w2, name, sizeof name, 3000) == 5, "an overflow event for what was dropped");

	current = "watch: the watched path deleted";
	send_frame(a, id, SM_RESET, 0, NULL, 0);
	for (int i = 0; i < 3; i++) {
		snprintf(p, sizeof p, "%s/%c", wdir, 'a' + i);
		rmdir(p);
	}
	rmdir(wdir);
	int e, saw_delete = 0;
	while ((e = next_event(a, w2, name, sizeof name, 3000)) >= 0 && e != 100)
		saw_delete |= e == 3 && name[0] == 0;
	CHECK(saw_delete && e == 100, "delete of the path itself, then OK");

	current = "watch: errors";
	snprintf(p, sizeof p, "%s/no-such-dir", tmpdir);
	expect_error(a, send_watch(a, p, 0, 0), SM_E_NOT_FOUND, ENOENT, "watch of nothing");
}

/* ------------------------------------------------------------------------------------------------
 * The workload.
 */

static uint32_t workload_start(struct agent *a, const char *const *argv)
{
	uint32_t id = a->next_id++;
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	for (int i = 0; argv[i]; i++)
		sm_put_str(&b, 1, argv[i]);
	sm_put_str(&b, 2, "PATH=/usr/bin:/bin");
	send_buf(a, &b, id, SM_WORKLOAD_START);
	sm_buf_free(&b);
	return id;
}

static uint32_t workload_simple(struct agent *a, uint8_t type, uint32_t signo)
{
	uint32_t id = a->next_id++;
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	if (type == SM_WORKLOAD_SIGNAL)
		sm_put_u32(&b, 1, signo);
	send_buf(a, &b, id, type);
	sm_buf_free(&b);
	return id;
}

static uint32_t workload_logs(struct agent *a, int follow, uint8_t streams)
{
	uint32_t id = a->next_id++;
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	if (follow)
		sm_put_u8(&b, 1, 1);
	if (streams)
		sm_put_u8(&b, 3, streams);
	send_buf(a, &b, id, SM_WORKLOAD_LOGS);
	sm_buf_free(&b);
	return id;
}

/* WORKLOAD_STATUS then OK on `id`; returns state, fills pid/code/signal (-1 when absent). */
static int workload_status(struct agent *a, uint32_t id, long *pid, long *code, long *sig)
{
	struct frame f;
	if (expect(a, &f, id, SM_WORKLOAD_STATUS, 3000))
		return -1;
	int state = (int)fu(&f, 1, 99);
	*pid = sm_find(f.f, f.nf, 2) ? (long)fu(&f, 2, 0) : -1;
	*code = sm_find(f.f, f.nf, 3) ? (long)sm_ival(sm_find(f.f, f.nf, 3)) : -1;
	*sig = sm_find(f.f, f.nf, 4) ? (long)fu(&f, 4, 0) : -1;
	expect_ok(a, id, "WORKLOAD_STATUS");
	return state;
}

/* Collect a logs stream until its OK, and any exit event on stream 0 meanwhile. */
static void collect_logs(struct agent *a, uint32_t id, char *out, size_t cap, int *exit_events)
{
	struct frame f;
	size_t n = 0;
	out[0] = 0;
	while (recv_frame(a, &f, 5000) == 0) {
		if (f.h.stream == 0 && f.h.type == SM_WORKLOAD_STATUS) {
			(*exit_events)++;
			continue;
		}
		if (f.h.stream != id) {
			fail("logs: a frame for stream %u", f.h.stream);
			return;
		}
		if (f.h.type == SM_OK)
			return;
		if (f.h.type == SM_STDOUT || f.h.type == SM_STDERR) {
			int k = snprintf(out + n, cap - n, "%s%.*s", f.h.type == SM_STDERR ? "E:" : "", (int)f.h.length, f.p);
			if (k > 0 && (size_t)k < cap - n)
				n += (size_t)k;
			continue;
		}
		fail("logs: unexpected %s", sm_type_name(f.h.type));
		return;
	}
	fail("logs: no OK");
}

void test_workload(void)
{
	struct agent a;
	struct frame f;
	long pid, code, sig;
	char out[4096];
	int exits = 0;
	start(&a);
	hello(&a, 11);

	current = "workload: none yet";
	CHECK(workload_status(&a, workload_simple(&a, SM_WORKLOAD_QUERY, 0), &pid, &code, &sig) == 0 && pid == -1,
	      "state none, no pid");
	expect_error(&a, workload_simple(&a, SM_WORKLOAD_SIGNAL, 15), SM_E_NOT_FOUND, ESRCH, "signal without a workload");
	collect_logs(&a, workload_logs(&a, 1, 0), out, sizeof out, &exits);
	CHECK(out[0] == 0, "no logs");

	current = "workload: runs, logs, exits";
	static const char *const script[] = { "sh", "-c", "echo out; echo err >&2; sleep 0.3; echo late; exit 3", NULL };
	uint32_t id = workload_start(&a, script);
	CHECK(workload_status(&a, id, &pid, &code, &sig) == 1 && pid > 0, "started: running, pid %ld", pid);
	long first = pid;
	static const char *const sleeper[] = { "sleep", "100", NULL };
	expect_error(&a, workload_start(&a, sleeper), SM_E_BAD_REQUEST, 0, "a second start while it runs");
	collect_logs(&a, workload_logs(&a, 1, 0), out, sizeof out, &exits);
	CHECK(strstr(out, "out\n") && strstr(out, "E:err\n") && strstr(out, "late\n"), "follow: everything ('%s')", out);
	if (!exits && recv_frame(&a, &f, 3000) == 0 && f.h.stream == 0 && f.h.type == SM_WORKLOAD_STATUS)
		exits++;
	CHECK(exits == 1, "one exit event on stream 0");
	CHECK(workload_status(&a, workload_simple(&a, SM_WORKLOAD_QUERY, 0), &pid, &code, &sig) == 2 && pid == first &&
		      code == 3 && sig == -1,
	      "exited with 3 (pid %ld code %ld signal %ld)", pid, code, sig);
	collect_logs(&a, workload_logs(&a, 0, 2), out, sizeof out, &exits);
	CHECK(!strcmp(out, "E:err\n"), "stderr only: '%s'", out);

	current = "workload: output nobody reads never blocks it";
	static const char *const loud[] = { "head", "-c", "5000000", "/dev/zero", NULL };
	id = workload_start(&a, loud);
	CHECK(workload_status(&a, id, &pid, &code, &sig) == 1, "running");
	int exited = 0;
	while (!exited && recv_frame(&a, &f, 10000) == 0)
		exited = f.h.stream == 0 && f.h.type == SM_WORKLOAD_STATUS && sm_ival(sm_find(f.f, f.nf, 3)) == 0;
	CHECK(exited, "5 MB of output and it exits 0, unread");
	id = workload_logs(&a, 0, 0);
	size_t total = 0;
	while (recv_frame(&a, &f, 3000) == 0 && f.h.type != SM_OK) {
		total += f.h.length;
		send_window(&a, id, f.h.length + SM_FRAME_COST);
	}
	CHECK(total > 900000 && total <= (1u << 20), "the ring holds its last ~1 MiB (%zu)", total);

	current = "workload: survives a new HELLO, takes signals";
	static const char *const missing[] = { "/no/such/program", NULL };
	expect_error(&a, workload_start(&a, missing), SM_E_NOT_FOUND, ENOENT, "a missing program");
	id = workload_start(&a, sleeper);
	CHECK(workload_status(&a, id, &pid, &code, &sig) == 1, "sleep running");
	long sleeping = pid;
	hello(&a, 12);
	CHECK(workload_status(&a, workload_simple(&a, SM_WORKLOAD_QUERY, 0), &pid, &code, &sig) == 1 && pid == sleeping,
	      "still running after HELLO (pid %ld)", pid);
	expect_ok(&a, workload_simple(&a, SM_WORKLOAD_SIGNAL, SIGTERM), "signal");
	if (expect(&a, &f, 0, SM_WORKLOAD_STATUS, 3000) == 0)
		CHECK(fu(&f, 1, 0) == 2 && fu(&f, 4, 0) == SIGTERM, "exit event: killed by SIGTERM");

	current = "workload: SHUTDOWN ends it";
	id = workload_start(&a, sleeper);
	CHECK(workload_status(&a, id, &pid, &code, &sig) == 1, "sleep running");
	send_frame(&a, 0, SM_SHUTDOWN, 0, NULL, 0);
	expect(&a, &f, 0, SM_OK, 3000);
	int st = stop(&a);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "agent exit 0 (0x%x)", st);
	CHECK(process_gone((pid_t)pid, 5000), "the workload is gone");
}
