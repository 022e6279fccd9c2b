/* The mount relay (mount.h, docs/mounts.md).
 *
 * Why a process of its own: the guest kernel's 9p client blocks every filesystem call on a mount
 * until the host answers, and the answers come through this relay. The agent's loop serves files
 * and execs that may touch mounted paths, so the relay must never wait on the agent, nor touch a
 * mounted filesystem itself: mount(2), mkdir -p and umount2(2) run in short-lived children while
 * the relay keeps moving bytes.
 *
 * Per mount: a socketpair; the kernel's end goes to the mount child (trans=fd,rfdno=3,wfdno=3) and
 * stays with the kernel after mount(2) returns; the relay's end is read into MOUNT_DATA frames
 * within the host's credit, and the host's MOUNT_DATA is written into it within the credit the
 * relay grants (WINDOW). Nothing is buffered without bound on either side. */
#define _GNU_SOURCE
#include "mount.h"

#include "agent.h"
#include "proto.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK 262144u
#define OUTQ_HIGH (1u << 20)  /* stop reading the mounts' sockets */
#define OUTQ_HARD (8u << 20)  /* stop reading the channel: the host is not reading */
#define WAIT_PORT_MS 30000
#define MAX_WINDOW (64u << 20) /* credit the host may give us beyond what we sent */
/* A new session's HELLO is answered once the previous session's mounts are detached, or after
 * this long (a detach child that hangs must not keep the host out). */
#define DETACH_WAIT_MS 2000

enum mstate { M_MOUNTING = 1, M_MOUNTED, M_UNMOUNTING };

struct mnt {
	uint32_t id;
	int state;
	char *path;
	int sock;	      /* the relay's end; -1 once cut */
	pid_t child;	      /* mount or umount child, 0 when none */
	uint64_t credit;      /* MOUNT_DATA bytes we may still send the host */
	uint64_t host_credit; /* MOUNT_DATA bytes the host may still send us */
	uint8_t *inq;	      /* host bytes not yet written into the socket */
	size_t inq_off, inq_len;
	size_t unacked; /* written into the socket, not yet granted back */
	int sock_eof;
	struct mnt *next;
};

static struct {
	int chan;
	int host_mode;
	const char *mount_exec;
	int sigfd;
	int connected;
	int reading;
	int in_session;
	uint32_t max_stream;
	unsigned nmounts;
	struct mnt *mounts;
	/* Children detaching the mounts of an abandoned session. */
	pid_t detaching[SM_MOUNT_MAX];
	unsigned ndetaching;
	/* A HELLO waiting for them: its epoch and deadline. */
	int hello_pending;
	uint64_t hello_epoch;
	int64_t hello_deadline_ns;
} R = { .chan = -1, .sigfd = -1 };

/* ------------------------------------------------------------------------------------------------
 * Output queue toward the host.
 */

struct qf {
	struct qf *next;
	size_t len, off;
	uint8_t data[];
};
static struct qf *q_head, *q_tail;
static size_t q_bytes;

static void q_push(const uint8_t *hdr, const void *p, size_t n)
{
	if (!R.connected)
		return;
	struct qf *f = malloc(sizeof *f + SM_HDR_SIZE + n);
	if (!f) {
		sm_log("mounts: out of memory queueing a frame");
		return;
	}
	f->next = NULL;
	f->len = SM_HDR_SIZE + n;
	f->off = 0;
	memcpy(f->data, hdr, SM_HDR_SIZE);
	if (n)
		memcpy(f->data + SM_HDR_SIZE, p, n);
	if (q_tail)
		q_tail->next = f;
	else
		q_head = f;
	q_tail = f;
	q_bytes += f->len;
}

static void q_drop(int keep_partial)
{
	struct qf *f = q_head, *keep = NULL;
	if (keep_partial && f && f->off > 0) {
		keep = f;
		f = f->next;
		keep->next = NULL;
	}
	while (f) {
		struct qf *n = f->next;
		free(f);
		f = n;
	}
	q_head = q_tail = keep;
	q_bytes = keep ? keep->len - keep->off : 0;
}

static void send_frame(uint32_t stream, uint8_t type, const void *p, size_t n)
{
	uint8_t hdr[SM_HDR_SIZE];
	struct sm_hdr h = { (uint32_t)n, stream, type, 0 };
	sm_hdr_encode(hdr, &h);
	sm_dbg("mounts: > type 0x%02x stream=%u len=%zu", type, stream, n);
	q_push(hdr, p, n);
}

static struct sm_buf fbuf;

static void send_fields(uint32_t stream, uint8_t type)
{
	size_t len = sm_frame_end(&fbuf, stream, type, 0);
	if (len)
		send_frame(stream, type, fbuf.data + SM_HDR_SIZE, len - SM_HDR_SIZE);
}

static void send_error(uint32_t stream, uint32_t code, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static void send_error(uint32_t stream, uint32_t code, int err, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	for (char *c = msg; *c; c++)
		if ((unsigned char)*c >= 0x80)
			*c = '?';
	sm_dbg("mounts: error on stream %u: code %u errno %d: %s", stream, code, err, msg);
	sm_frame_begin(&fbuf);
	sm_put_u32(&fbuf, 1, code);
	if (err > 0)
		sm_put_u32(&fbuf, 2, (uint32_t)err);
	sm_put_str(&fbuf, 3, msg);
	send_fields(stream, SM_ERROR);
}

static void send_window(uint32_t stream, uint32_t n)
{
	uint8_t v[4];
	sm_put32(v, n);
	send_frame(stream, SM_WINDOW, v, 4);
}

/* ------------------------------------------------------------------------------------------------
 * Mounts.
 */

static struct mnt *find(uint32_t id)
{
	for (struct mnt *m = R.mounts; m; m = m->next)
		if (m->id == id)
			return m;
	return NULL;
}

/* Close every descriptor but 0, 1, 2 and `keep` (which becomes 3). For children that do not exec
 * (or exec a program that must not inherit the channel). */
static void child_fds(int keep)
{
	if (keep >= 0 && keep != 3) {
		if (dup2(keep, 3) < 0)
			_exit(EBADF);
	}
	int from = keep >= 0 ? 4 : 3;
	if (syscall(SYS_close_range, from, ~0u, 0) < 0) {
		for (int fd = from; fd < 4096; fd++)
			close(fd);
	}
}

static void child_signals(void)
{
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL);
}

static int mkdir_p(const char *path)
{
	char buf[4096];
	size_t n = strlen(path);
	if (n >= sizeof buf) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(buf, path, n + 1);
	for (char *p = buf + 1;; p++) {
		if (*p != '/' && *p)
			continue;
		char c = *p;
		*p = 0;
		if (mkdir(buf, 0755) < 0 && errno != EEXIST)
			return -1;
		*p = c;
		if (!c)
			return 0;
	}
}

static pid_t fork_mount(const char *path, int kfd, uint32_t msize, int ro, const char *cache)
{
	pid_t pid = fork();
	if (pid != 0)
		return pid;
	child_signals();
	child_fds(kfd);
	if (R.mount_exec) {
		char ms[16], rs[4];
		snprintf(ms, sizeof ms, "%u", msize);
		snprintf(rs, sizeof rs, "%d", ro);
		char *argv[] = { (char *)R.mount_exec, (char *)path, ms, rs, NULL };
		execv(R.mount_exec, argv);
		_exit(errno & 0xff);
	}
	if (mkdir_p(path) < 0)
		_exit(errno & 0xff);
	char opts[256];
	snprintf(opts, sizeof opts, "trans=fd,rfdno=3,wfdno=3,version=9p2000.L,msize=%u,cache=%s", msize, cache);
	unsigned long flags = MS_NOSUID | MS_NODEV | (ro ? MS_RDONLY : 0);
	if (mount("supermachine", path, "9p", flags, opts) < 0)
		_exit(errno & 0xff);
	_exit(0);
}

static pid_t fork_unmount(const char *path)
{
	pid_t pid = fork();
	if (pid != 0)
		return pid;
	child_signals();
	child_fds(-1);
	if (R.host_mode)
		_exit(0);
	/* Lazily: files still open keep working until the relay cuts the connection. */
	if (umount2(path, MNT_DETACH) < 0)
		_exit(errno & 0xff);
	_exit(0);
}

/* Cut the 9P connection: the kernel's requests in flight fail and its transport shuts down. */
static void cut(struct mnt *m)
{
	if (m->sock >= 0) {
		shutdown(m->sock, SHUT_RDWR);
		close(m->sock);
		m->sock = -1;
	}
	free(m->inq);
	m->inq = NULL;
	m->inq_len = m->inq_off = 0;
}

static void forget(struct mnt *m)
{
	cut(m);
	struct mnt **pp = &R.mounts;
	while (*pp && *pp != m)
		pp = &(*pp)->next;
	if (*pp)
		*pp = m->next;
	R.nmounts--;
	free(m->path);
	free(m);
}

/* Abandon a mount without answering (new session, host gone, RESET): kill a mount in progress,
 * cut the connection, detach a mount that was made. */
static void abandon(struct mnt *m)
{
	if (m->state == M_MOUNTING && m->child > 0)
		kill(m->child, SIGKILL);
	cut(m);
	if (m->state == M_MOUNTED && !R.host_mode) {
		pid_t pid = fork_unmount(m->path);
		if (pid < 0)
			sm_log("mounts: cannot fork to unmount %s: %s", m->path, strerror(errno));
		else if (R.ndetaching < SM_MOUNT_MAX)
			R.detaching[R.ndetaching++] = pid;
	}
	forget(m);
}

static void abandon_all(void)
{
	while (R.mounts)
		abandon(R.mounts);
}

/* Batched grants: one WINDOW per quarter window written. The host's credit, the queue and the
 * bytes written but not granted always add up to SM_MOUNT_WINDOW, so the host never waits on a
 * grant while the queue is empty. */
static void grant(struct mnt *m)
{
	if (m->unacked >= SM_MOUNT_WINDOW / 4) {
		m->host_credit += m->unacked;
		send_window(m->id, (uint32_t)m->unacked);
		m->unacked = 0;
	}
}

static void sock_write(struct mnt *m)
{
	while (m->inq_len > 0 && m->sock >= 0) {
		ssize_t w = write(m->sock, m->inq + m->inq_off, m->inq_len);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				break;
			/* The kernel closed its end: the reader side will see EOF. Drop what is queued. */
			m->unacked += m->inq_len;
			m->inq_len = m->inq_off = 0;
			break;
		}
		m->inq_off += (size_t)w;
		m->inq_len -= (size_t)w;
		m->unacked += (size_t)w;
	}
	if (m->inq_len == 0)
		m->inq_off = 0;
	grant(m);
}

static void sock_read(struct mnt *m)
{
	static uint8_t buf[CHUNK];
	/* Every frame costs its payload plus SM_FRAME_COST (docs/protocol.md, "Credit"). */
	while (m->sock >= 0 && m->credit > SM_FRAME_COST && q_bytes < OUTQ_HIGH) {
		uint64_t room = m->credit - SM_FRAME_COST;
		size_t want = room < CHUNK ? (size_t)room : CHUNK;
		ssize_t r = read(m->sock, buf, want);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				m->sock_eof = 1;
			return;
		}
		if (r == 0) {
			m->sock_eof = 1;
			return;
		}
		m->credit -= (uint64_t)r + SM_FRAME_COST;
		send_frame(m->id, SM_MOUNT_DATA, buf, (size_t)r);
	}
}

/* The kernel closed its end of the 9P connection: the filesystem is gone (unmounted in the guest). */
static void sock_ended(struct mnt *m)
{
	if (m->state == M_MOUNTING)
		return; /* the mount child's exit status tells what happened */
	if (m->state == M_UNMOUNTING && m->child > 0)
		return; /* the unmount child's exit ends the stream */
	sm_dbg("mounts: %s was unmounted in the guest", m->path);
	sm_frame_begin(&fbuf);
	send_fields(m->id, SM_OK);
	forget(m);
}

static void answer_hello(void);

static void reaped(pid_t pid, int status)
{
	for (unsigned i = 0; i < R.ndetaching; i++) {
		if (R.detaching[i] != pid)
			continue;
		R.detaching[i] = R.detaching[--R.ndetaching];
		if (R.ndetaching == 0 && R.hello_pending)
			answer_hello();
		return;
	}
	for (struct mnt *m = R.mounts; m; m = m->next) {
		if (m->child != pid)
			continue;
		m->child = 0;
		int err = WIFEXITED(status) ? WEXITSTATUS(status) : EINTR;
		if (m->state == M_MOUNTING) {
			if (err == 0) {
				m->state = M_MOUNTED;
				sm_dbg("mounts: %s mounted", m->path);
				sm_frame_begin(&fbuf);
				send_fields(m->id, SM_MOUNTED);
				if (m->sock_eof)
					sock_ended(m);
			} else {
				send_error(m->id, SM_E_IO, err, "mount %s: %s", m->path, strerror(err));
				forget(m);
			}
		} else if (m->state == M_UNMOUNTING) {
			if (err)
				sm_log("mounts: unmounting %s: %s", m->path, strerror(err));
			sm_frame_begin(&fbuf);
			send_fields(m->id, SM_OK);
			forget(m);
		}
		return;
	}
}

/* ------------------------------------------------------------------------------------------------
 * Frames from the host.
 */

static struct sm_field fields[SM_MAX_FIELDS];

static int path_ok(const char *p)
{
	if (p[0] != '/' || strlen(p) >= 4096)
		return 0;
	for (const char *s = p; *s;) {
		const char *e = strchr(s, '/');
		size_t n = e ? (size_t)(e - s) : strlen(s);
		if ((n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.'))
			return 0;
		if (!e)
			break;
		s = e + 1;
	}
	return 1;
}

/* MOUNT, its fields already checked by sm_mount_msg_check. */
static void on_mount(uint32_t id, const uint8_t *p, size_t n)
{
	int nf = sm_fields_split(p, n, fields, SM_MAX_FIELDS);
	const struct sm_field *pf = sm_find(fields, nf, 1), *cf = sm_find(fields, nf, 5);
	char path[4096], cache[16] = "mmap";
	if (pf->len >= sizeof path) {
		send_error(id, SM_E_BAD_REQUEST, 0, "MOUNT: path too long");
		return;
	}
	memcpy(path, pf->val, pf->len);
	path[pf->len] = 0;
	if (cf) {
		if (cf->len >= sizeof cache) {
			send_error(id, SM_E_BAD_REQUEST, 0, "MOUNT: bad cache mode");
			return;
		}
		memcpy(cache, cf->val, cf->len);
		cache[cf->len] = 0;
	}
	uint32_t msize = (uint32_t)sm_get_u(fields, nf, 2, 524288);
	uint64_t ro = sm_get_u(fields, nf, 3, 0);
	uint32_t window = (uint32_t)sm_get_u(fields, nf, 4, 262144);
	if (!path_ok(path) || !strcmp(path, "/")) {
		send_error(id, SM_E_BAD_REQUEST, EINVAL, "MOUNT: %s is not an absolute path below /", path);
		return;
	}
	if (msize < 4096 || msize > (1u << 20) || ro > 1 || window > MAX_WINDOW ||
	    (strcmp(cache, "none") && strcmp(cache, "mmap") && strcmp(cache, "loose"))) {
		send_error(id, SM_E_BAD_REQUEST, EINVAL, "MOUNT: msize, readOnly, window or cache out of range");
		return;
	}
	if (R.nmounts >= SM_MOUNT_MAX) {
		send_error(id, SM_E_BAD_REQUEST, EMFILE, "MOUNT: %u mounts are open already", R.nmounts);
		return;
	}
	if (R.host_mode && !R.mount_exec) {
		send_error(id, SM_E_UNSUPPORTED, 0, "MOUNT: this relay runs on the host and cannot mount");
		return;
	}
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
		send_error(id, SM_E_IO, errno, "MOUNT: socketpair: %s", strerror(errno));
		return;
	}
	struct mnt *m = calloc(1, sizeof *m);
	char *dup = strdup(path);
	if (!m || !dup) {
		free(m);
		free(dup);
		close(sv[0]);
		close(sv[1]);
		send_error(id, SM_E_IO, ENOMEM, "MOUNT: out of memory");
		return;
	}
	fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK);
	m->id = id;
	m->state = M_MOUNTING;
	m->path = dup;
	m->sock = sv[0];
	m->credit = window;
	m->host_credit = SM_MOUNT_WINDOW;
	m->next = R.mounts;
	R.mounts = m;
	R.nmounts++;
	m->child = fork_mount(path, sv[1], msize, (int)ro, cache);
	close(sv[1]);
	if (m->child < 0) {
		int e = errno;
		m->child = 0;
		send_error(id, SM_E_IO, e, "MOUNT: fork: %s", strerror(e));
		forget(m);
		return;
	}
	sm_dbg("mounts: mounting %s (stream %u, msize %u, %s, cache=%s)", path, id, msize, ro ? "ro" : "rw", cache);
}

static void on_unmount(struct mnt *m)
{
	if (m->state == M_UNMOUNTING)
		return;
	if (m->state == M_MOUNTING) {
		/* Not mounted yet: stop the mount and end the stream. */
		if (m->child > 0)
			kill(m->child, SIGKILL);
		cut(m);
		sm_frame_begin(&fbuf);
		send_fields(m->id, SM_OK);
		forget(m);
		return;
	}
	m->state = M_UNMOUNTING;
	m->child = fork_unmount(m->path);
	if (m->child < 0) {
		sm_log("mounts: cannot fork to unmount %s: %s", m->path, strerror(errno));
		m->child = 0;
		cut(m);
		sm_frame_begin(&fbuf);
		send_fields(m->id, SM_OK);
		forget(m);
	}
}

static void on_data(struct mnt *m, const uint8_t *p, size_t n)
{
	if (n > m->host_credit) {
		send_error(m->id, SM_E_BAD_REQUEST, 0, "MOUNT_DATA: %zu bytes exceed the %llu granted", n,
			   (unsigned long long)m->host_credit);
		abandon(m);
		return;
	}
	m->host_credit -= n;
	if (m->sock < 0) {
		m->unacked += n; /* cut: the bytes go nowhere, the credit comes back */
		grant(m);
		return;
	}
	if (!m->inq) {
		m->inq = malloc(SM_MOUNT_WINDOW);
		if (!m->inq) {
			send_error(m->id, SM_E_IO, ENOMEM, "out of memory");
			abandon(m);
			return;
		}
	}
	/* The host sends at most what we granted, and we grant only what has left the queue: it fits. */
	if (m->inq_off + m->inq_len + n > SM_MOUNT_WINDOW) {
		memmove(m->inq, m->inq + m->inq_off, m->inq_len);
		m->inq_off = 0;
	}
	memcpy(m->inq + m->inq_off + m->inq_len, p, n);
	m->inq_len += n;
	sock_write(m);
}

/* HELLO, its fields already checked by sm_mount_msg_check (the agent's HELLO layout). */
static void on_hello(const uint8_t *p, size_t n)
{
	int nf = sm_fields_split(p, n, fields, SM_MAX_FIELDS);
	uint32_t version = (uint32_t)sm_get_u(fields, nf, 1, 0);
	uint64_t epoch = sm_get_u(fields, nf, 2, 0);
	/* A new session: the mounts of the previous one are gone with the host's servers. */
	abandon_all();
	q_drop(1);
	R.in_session = 0;
	R.hello_pending = 0;
	R.max_stream = 0;
	if (version != SM_MOUNT_PROTO_VERSION) {
		send_error(0, SM_E_VERSION, 0, "the mount relay speaks version %u, the host %u", SM_MOUNT_PROTO_VERSION,
			   version);
		return;
	}
	/* Answer once they are detached: the new session starts without them. */
	R.hello_epoch = epoch;
	R.hello_pending = 1;
	R.hello_deadline_ns = sm_now_ns() + (int64_t)DETACH_WAIT_MS * 1000000;
	if (R.ndetaching == 0)
		answer_hello();
}

static void answer_hello(void)
{
	R.hello_pending = 0;
	R.in_session = 1;
	sm_frame_begin(&fbuf);
	sm_put_u32(&fbuf, 1, SM_MOUNT_PROTO_VERSION);
	sm_put_u64(&fbuf, 2, R.hello_epoch);
	sm_put_str(&fbuf, 5, SM_AGENT_NAME " mounts");
	send_fields(0, SM_HELLO);
}

/* Answer a bad frame with ERROR on the stream it belongs to: a live mount (which that ends), a new
 * MOUNT (which it ends before it starts), else stream 0. */
static void reject(const struct sm_hdr *h, struct mnt *m, uint32_t code, const char *msg)
{
	if (m) {
		send_error(m->id, code, 0, "type 0x%02x: %s", h->type, msg);
		abandon(m);
	} else if (h->type == SM_MOUNT && h->stream > R.max_stream) {
		R.max_stream = h->stream;
		send_error(h->stream, code, 0, "MOUNT: %s", msg);
	} else {
		send_error(0, code, 0, "type 0x%02x on stream %u: %s", h->type, h->stream, msg);
	}
}

static void on_frame(const struct sm_hdr *h, const uint8_t *p)
{
	unsigned t = h->type;
	char err[256];
	sm_dbg("mounts: < type 0x%02x stream=%u len=%u", t, h->stream, h->length);
	struct mnt *m = h->stream ? find(h->stream) : NULL;
	if (!sm_mount_type_from_host(t)) {
		int known = sm_mount_type_name(t) || sm_mount_type_from_guest(t);
		reject(h, m, known ? SM_E_BAD_REQUEST : SM_E_UNSUPPORTED,
		       known ? "not sent by the host" : "not a message of the mounts channel");
		return;
	}
	int control = t == SM_HELLO || t == SM_PING;
	if (control != (h->stream == 0)) {
		reject(h, m, SM_E_BAD_REQUEST, control ? "it belongs on stream 0" : "it needs a stream other than 0");
		return;
	}
	if (t != SM_HELLO && !R.in_session) {
		send_error(0, SM_E_BAD_REQUEST, 0, "type 0x%02x before HELLO", t);
		return;
	}
	if (t == SM_MOUNT && h->stream <= R.max_stream) {
		send_error(0, SM_E_BAD_REQUEST, 0, "MOUNT: stream id %u was already used (ids must increase)", h->stream);
		return;
	}
	if (!control && t != SM_MOUNT && !m) {
		if (h->stream > R.max_stream)
			send_error(0, SM_E_BAD_REQUEST, 0, "type 0x%02x for stream %u, which was never opened", t,
				   h->stream);
		return; /* an ended stream: frames still in flight are dropped */
	}
	if (h->flags) {
		reject(h, m, SM_E_BAD_REQUEST, "no flags are defined on the mounts channel");
		return;
	}
	if (sm_mount_msg_check(t, 1, p, h->length, err, sizeof err)) {
		reject(h, m, SM_E_BAD_REQUEST, err);
		return;
	}
	switch (t) {
	case SM_HELLO:
		on_hello(p, h->length);
		return;
	case SM_PING:
		send_frame(0, SM_PONG, p, h->length);
		return;
	case SM_MOUNT:
		R.max_stream = h->stream;
		on_mount(h->stream, p, h->length);
		return;
	case SM_MOUNT_DATA:
		on_data(m, p, h->length);
		return;
	case SM_WINDOW:
		m->credit += sm_be32(p);
		if (m->credit > MAX_WINDOW)
			reject(h, m, SM_E_BAD_REQUEST, "credit above the limit");
		return;
	case SM_UNMOUNT:
		on_unmount(m);
		return;
	case SM_RESET:
		sm_dbg("mounts: stream %u reset by the host", m->id);
		abandon(m);
		return;
	default:
		return;
	}
}

/* ------------------------------------------------------------------------------------------------
 * Channel.
 */

static uint8_t inbuf[SM_HDR_SIZE + SM_MAX_PAYLOAD];
static size_t in_start, in_end;

static void chan_async(int on)
{
	int fl = fcntl(R.chan, F_GETFL);
	if (fl >= 0)
		fcntl(R.chan, F_SETFL, on ? fl | O_ASYNC : fl & ~O_ASYNC);
}

static void __attribute__((noreturn)) host_exit(int code)
{
	for (struct mnt *m = R.mounts; m; m = m->next)
		if (m->child > 0)
			kill(m->child, SIGKILL);
	_exit(code);
}

static void chan_disconnected(void)
{
	if (R.host_mode)
		host_exit(0);
	if (R.connected)
		sm_log("mounts: host disconnected; its mounts are cut");
	R.connected = 0;
	R.reading = 1;
	R.in_session = 0;
	R.hello_pending = 0;
	in_start = in_end = 0;
	abandon_all();
	q_drop(0);
	chan_async(1);
}

static void chan_check_connected(void)
{
	if (R.connected || R.host_mode)
		return;
	struct pollfd p = { .fd = R.chan, .events = POLLIN };
	if (poll(&p, 1, 0) < 0 || (p.revents & POLLHUP))
		return;
	chan_async(0);
	R.connected = 1;
	R.reading = 1;
	in_start = in_end = 0;
}

static void chan_flush(void)
{
	while (q_head && R.connected) {
		struct iovec iov[64];
		int k = 0;
		for (struct qf *f = q_head; f && k < 64; f = f->next, k++) {
			iov[k].iov_base = f->data + f->off;
			iov[k].iov_len = f->len - f->off;
		}
		ssize_t w = writev(R.chan, iov, k);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				chan_disconnected();
			return;
		}
		q_bytes -= (size_t)w;
		while (w > 0) {
			struct qf *f = q_head;
			size_t left = f->len - f->off;
			if ((size_t)w < left) {
				f->off += (size_t)w;
				break;
			}
			w -= (ssize_t)left;
			q_head = f->next;
			if (!q_head)
				q_tail = NULL;
			free(f);
		}
	}
}

static void bad_frame(const char *why)
{
	sm_log("mounts: bad frame from the host: %s; ignoring the channel until the host reconnects", why);
	send_error(0, SM_E_BAD_FRAME, 0, "bad frame: %s", why);
	if (R.host_mode) {
		chan_flush();
		host_exit(1);
	}
	R.reading = 0;
	in_start = in_end = 0;
	abandon_all();
}

static void chan_read(void)
{
	size_t total = 0;
	while (R.reading && R.connected && total < (2u << 20) && q_bytes < OUTQ_HARD) {
		if (in_start == in_end)
			in_start = in_end = 0;
		ssize_t r = read(R.chan, inbuf + in_end, sizeof inbuf - in_end);
		if (r == 0) {
			chan_disconnected();
			return;
		}
		if (r < 0) {
			if (errno != EAGAIN && errno != EINTR)
				chan_disconnected();
			return;
		}
		in_end += (size_t)r;
		total += (size_t)r;
		while (R.reading && R.connected && in_end - in_start >= SM_HDR_SIZE) {
			struct sm_hdr h;
			if (sm_hdr_decode(inbuf + in_start, &h)) {
				bad_frame(h.length > SM_MAX_PAYLOAD ? "payload too large" : "reserved flag bits set");
				return;
			}
			if (in_end - in_start < SM_HDR_SIZE + h.length)
				break;
			size_t at = in_start;
			in_start += SM_HDR_SIZE + h.length;
			on_frame(&h, inbuf + at + SM_HDR_SIZE);
		}
		if (in_start > 0 && in_start < in_end) {
			memmove(inbuf, inbuf + in_start, in_end - in_start);
			in_end -= in_start;
			in_start = 0;
		}
	}
}

/* ------------------------------------------------------------------------------------------------
 * Main loop.
 */

static void on_signals(void)
{
	struct signalfd_siginfo si[16];
	for (;;) {
		ssize_t r = read(R.sigfd, si, sizeof si);
		if (r <= 0)
			return;
		for (size_t i = 0; i < (size_t)r / sizeof si[0]; i++) {
			switch (si[i].ssi_signo) {
			case SIGCHLD:
				for (;;) {
					int status;
					pid_t pid = waitpid(-1, &status, WNOHANG);
					if (pid <= 0)
						break;
					reaped(pid, status);
				}
				break;
			case SIGIO:
				chan_check_connected();
				break;
			case SIGTERM: case SIGINT: case SIGHUP:
				if (R.host_mode)
					host_exit(0);
				break;
			default:
				break;
			}
		}
	}
}

int sm_mount_relay_run(int chan_fd, int host_mode, const char *mount_exec, int debug)
{
	A.debug = debug;
	R.chan = chan_fd;
	R.host_mode = host_mode;
	R.mount_exec = mount_exec;
	R.reading = 1;
	signal(SIGPIPE, SIG_IGN);
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	sigaddset(&set, SIGIO);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	sigprocmask(SIG_BLOCK, &set, NULL);
	R.sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	if (R.sigfd < 0) {
		sm_log("mounts: signalfd: %s", strerror(errno));
		return 1;
	}
	fcntl(chan_fd, F_SETFL, fcntl(chan_fd, F_GETFL) | O_NONBLOCK);
	fcntl(chan_fd, F_SETFD, FD_CLOEXEC);
	if (host_mode) {
		R.connected = 1;
	} else {
		fcntl(chan_fd, F_SETOWN, getpid());
		chan_async(1);
		chan_check_connected();
	}
	struct pollfd *pfd = NULL;
	struct mnt **tag = NULL;
	size_t cap = 0;
	for (;;) {
		size_t need = 2 + R.nmounts;
		if (need > cap) {
			cap = need + 16;
			pfd = realloc(pfd, cap * sizeof *pfd);
			tag = realloc(tag, cap * sizeof *tag);
			if (!pfd || !tag) {
				sm_log("mounts: out of memory");
				return 1;
			}
		}
		size_t n = 0;
		pfd[n] = (struct pollfd){ .fd = R.sigfd, .events = POLLIN };
		tag[n++] = NULL;
		int chan_idx = -1;
		if (R.connected) {
			short ev = 0;
			if (R.reading && q_bytes < OUTQ_HARD)
				ev |= POLLIN;
			if (q_head)
				ev |= POLLOUT;
			chan_idx = (int)n;
			pfd[n] = (struct pollfd){ .fd = R.chan, .events = ev };
			tag[n++] = NULL;
		}
		for (struct mnt *m = R.mounts; m; m = m->next) {
			if (m->sock < 0 || m->sock_eof)
				continue;
			short ev = 0;
			if (m->credit > SM_FRAME_COST && q_bytes < OUTQ_HIGH)
				ev |= POLLIN;
			if (m->inq_len)
				ev |= POLLOUT;
			pfd[n] = (struct pollfd){ .fd = m->sock, .events = ev };
			tag[n++] = m;
		}
		int timeout = (!R.connected && !R.host_mode) ? 1000 : -1;
		if (R.hello_pending) {
			int64_t left = (R.hello_deadline_ns - sm_now_ns() + 999999) / 1000000;
			timeout = left < 0 ? 0 : (int)left;
		}
		if (poll(pfd, n, timeout) < 0 && errno != EINTR) {
			sm_log("mounts: poll: %s", strerror(errno));
			return 1;
		}
		if (pfd[0].revents)
			on_signals();
		for (size_t i = 2; i < n; i++) {
			struct mnt *m = tag[i];
			if (!pfd[i].revents || !m)
				continue;
			/* The mount may have ended meanwhile (signals, channel frames): look it up again. */
			int live = 0;
			for (struct mnt *x = R.mounts; x; x = x->next)
				live |= x == m;
			if (!live || m->sock < 0)
				continue;
			if (pfd[i].revents & POLLOUT)
				sock_write(m);
			if (pfd[i].revents & (POLLIN | POLLHUP | POLLERR))
				sock_read(m);
			if (m->sock_eof)
				sock_ended(m);
		}
		if (chan_idx >= 0 && R.connected && pfd[chan_idx].revents) {
			short re = pfd[chan_idx].revents;
			if (re & POLLOUT)
				chan_flush();
			if (R.connected && (re & POLLIN) && R.reading) {
				chan_read();
			} else if (R.connected && (re & (POLLHUP | POLLERR))) {
				char junk[4096];
				ssize_t k;
				while ((k = read(R.chan, junk, sizeof junk)) > 0)
					;
				if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR))
					chan_disconnected();
			}
		}
		if (R.hello_pending && sm_now_ns() >= R.hello_deadline_ns) {
			sm_log("mounts: the previous session's mounts are not detached yet; starting the new one");
			answer_hello();
		}
		if (!R.connected && !R.host_mode)
			chan_check_connected();
		chan_flush();
	}
}

/* ------------------------------------------------------------------------------------------------
 * Start in the VM.
 */

static int read_name(const char *dev, char *out, size_t cap)
{
	char path[300];
	snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", dev);
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

static int open_mounts_port(void)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	if (!d)
		return -1;
	struct dirent *e;
	int fd = -1;
	while ((e = readdir(d))) {
		char name[160], path[300];
		if (strncmp(e->d_name, "vport", 5) != 0 || read_name(e->d_name, name, sizeof name) < 0 ||
		    strcmp(name, SM_MOUNT_PORT) != 0)
			continue;
		snprintf(path, sizeof path, "/dev/%s", e->d_name);
		fd = open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
		break;
	}
	closedir(d);
	return fd;
}

static pid_t relay_pid;

void sm_mount_relay_stop(void)
{
	if (relay_pid > 0)
		kill(relay_pid, SIGKILL);
	relay_pid = 0;
}

void sm_mount_relay_start(const int *close_fds, int debug)
{
	pid_t pid = fork();
	if (pid < 0) {
		sm_log("mounts: cannot start the mount relay: %s", strerror(errno));
		return;
	}
	if (pid > 0) {
		relay_pid = pid;
		return;
	}
	for (const int *fd = close_fds; *fd >= 0; fd++)
		close(*fd);
	setsid();
	prctl(PR_SET_NAME, "sm-mounts");
	if (chdir("/") < 0)
		_exit(1);
	int port = -1;
	for (int waited = 0, step = 1; (port = open_mounts_port()) < 0; waited += step, step = step < 64 ? step * 2 : 64) {
		if (waited >= WAIT_PORT_MS) {
			sm_dbg("mounts: no %s port: mounts are not available", SM_MOUNT_PORT);
			_exit(0);
		}
		struct timespec ts = { step / 1000, (long)(step % 1000) * 1000000 };
		nanosleep(&ts, NULL);
	}
	_exit(sm_mount_relay_run(port, 0, NULL, debug));
}
