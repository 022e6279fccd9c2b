/* The workload (docs/protocol.md, "The workload"): the image's entrypoint, started once by the host
 * and owned by the VM rather than by a session. A new HELLO leaves it running; SHUTDOWN ends it.
 * Its stdout and stderr are always read, into a bounded ring of records, so it never blocks on
 * its output; WORKLOAD_LOGS streams send what the ring holds (and, following, what comes next)
 * within the host's credit. */
#define _GNU_SOURCE
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <unistd.h>

#define RING_CAP (1u << 20) /* bytes of output kept, record headers included */
#define REC_MAX 16384u      /* largest record payload */
#define REC_HDR 3u          /* u8 kind (1 stdout, 2 stderr), u16 length */
#define READS_PER_EVENT 16  /* pipe reads per poll event, so that other fds get their turn */

enum { WL_NONE, WL_RUNNING, WL_EXITED };

static struct {
	int state;
	pid_t pid;      /* also its process group (it runs in a new session) */
	pid_t failed;   /* a child whose start failed: reaped without a report */
	int status;     /* wait status once exited */
	int errfd;      /* start-error pipe until the outcome is known */
	uint32_t start_stream;
	int out, err;   /* our ends of its stdout and stderr pipes */
	uint32_t cgroup; /* its processes' cgroup (cgroup.c), 0 for none */
	uint8_t *ring;
	uint64_t head, tail; /* absolute positions of the ring's oldest record and of its end */
} W = { .errfd = -1, .out = -1, .err = -1 };

/* A WORKLOAD_LOGS reader. */
struct logs {
	uint64_t pos;   /* start of the record being sent */
	uint32_t off;   /* bytes of that record already sent */
	uint64_t stop;  /* ring position where the stream ends (UINT64_MAX: following a running workload) */
	uint64_t credit;
	uint8_t mask;   /* 1 stdout, 2 stderr */
};

static struct sm_field wf[SM_MAX_FIELDS];

/* ------------------------------------------------------------------------------------------------
 * The ring: records [u8 kind][u16 length][payload] in a circular buffer addressed by absolute
 * position; the oldest records are dropped to make room.
 */

static void ring_in(uint64_t at, const uint8_t *p, size_t n)
{
	size_t o = (size_t)(at % RING_CAP), first = RING_CAP - o < n ? RING_CAP - o : n;
	memcpy(W.ring + o, p, first);
	memcpy(W.ring, p + first, n - first);
}

static void ring_out(uint64_t at, uint8_t *p, size_t n)
{
	size_t o = (size_t)(at % RING_CAP), first = RING_CAP - o < n ? RING_CAP - o : n;
	memcpy(p, W.ring + o, first);
	memcpy(p + first, W.ring, n - first);
}

static void ring_rec(uint64_t at, uint8_t *kind, uint32_t *len)
{
	uint8_t h[REC_HDR];
	ring_out(at, h, REC_HDR);
	*kind = h[0];
	*len = sm_be16(h + 1);
}

static void ring_put(uint8_t kind, const uint8_t *p, size_t n)
{
	while (W.tail + REC_HDR + n - W.head > RING_CAP) {
		uint8_t k;
		uint32_t len;
		ring_rec(W.head, &k, &len);
		W.head += REC_HDR + len;
	}
	uint8_t h[REC_HDR] = { kind };
	sm_put16(h + 1, (uint16_t)n);
	ring_in(W.tail, h, REC_HDR);
	ring_in(W.tail + REC_HDR, p, n);
	W.tail += REC_HDR + n;
}

/* Read what a pipe holds into the ring: up to `limit` bytes (0 = READS_PER_EVENT reads). */
static void drain_pipe(int *fd, uint8_t kind, uint64_t limit)
{
	uint8_t buf[REC_MAX];
	for (int i = 0; *fd >= 0 && (limit ? limit > 0 : i < READS_PER_EVENT); i++) {
		size_t want = limit && limit < sizeof buf ? (size_t)limit : sizeof buf;
		ssize_t r = read(*fd, buf, want);
		if (r > 0) {
			ring_put(kind, buf, (size_t)r);
			if (limit)
				limit -= (uint64_t)r;
			continue;
		}
		if (r < 0 && (errno == EINTR))
			continue;
		if (r < 0 && errno == EAGAIN)
			return;
		close(*fd); /* EOF: every writer is gone */
		*fd = -1;
	}
}

/* ------------------------------------------------------------------------------------------------
 * Status.
 */

static void put_status(struct sm_buf *b)
{
	sm_put_u8(b, 1, (uint8_t)W.state);
	if (W.state != WL_NONE)
		sm_put_u32(b, 2, (uint32_t)W.pid);
	if (W.state == WL_EXITED) {
		if (WIFEXITED(W.status))
			sm_put_i32(b, 3, WEXITSTATUS(W.status));
		else if (WIFSIGNALED(W.status))
			sm_put_u32(b, 4, (uint32_t)WTERMSIG(W.status));
	}
}

static void answer_status(uint32_t id)
{
	struct sm_buf *b = sm_scratch();
	put_status(b);
	sm_send_buf(b, id, SM_WORKLOAD_STATUS, 0);
	sm_send_buf(sm_scratch(), id, SM_OK, 0);
}

/* ------------------------------------------------------------------------------------------------
 * Starting.
 */

static void start(uint32_t id, const uint8_t *p, size_t n)
{
	static const struct sm_spec spec[] = {
		{ 1, SM_K_STRING, SM_REQ | SM_REP },
		{ 2, SM_K_STRING, SM_REP },
		{ 3, SM_K_STRING, 0 },
		{ 4, SM_K_STRING, 0 },
	};
	char err[512];
	if (W.state == WL_RUNNING) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "WORKLOAD_START: the workload is already running (pid %d)",
			      (int)W.pid);
		return;
	}
	int nf = sm_fields_split(p, n, wf, SM_MAX_FIELDS);
	if (nf < 0 || sm_fields_check(wf, nf, spec, 4, err, sizeof err)) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "WORKLOAD_START: %s", nf < 0 ? "malformed fields" : err);
		return;
	}
	size_t nargv = 0, nenv = 0;
	for (int i = 0; i < nf; i++) {
		nargv += wf[i].tag == 1;
		nenv += wf[i].tag == 2;
	}
	/* Everything the child needs, in one allocation freed after the fork. */
	char *arena = malloc(n + 16 + 1024 + (nargv + nenv + 4) * sizeof(char *));
	if (!arena) {
		sm_send_error(id, SM_E_START_FAILED, ENOMEM, "WORKLOAD_START: out of memory");
		return;
	}
	char **argv = (char **)(void *)arena;
	char **env = argv + nargv + 1;
	char *at = (char *)(env + nenv + 2);
	const char *cwd = "/", *user = NULL;
	int has_home = 0;
	size_t ia = 0, ie = 0;
	for (int i = 0; i < nf; i++) {
		const struct sm_field *f = &wf[i];
		if (f->tag < 1 || f->tag > 4)
			continue;
		char *v = at;
		memcpy(v, f->val, f->len);
		v[f->len] = 0;
		at += f->len + 1;
		if (f->tag == 1)
			argv[ia++] = v;
		else if (f->tag == 2) {
			env[ie++] = v;
			has_home |= !strncmp(v, "HOME=", 5);
		} else if (f->tag == 3 && *v)
			cwd = v;
		else if (f->tag == 4)
			user = v;
	}
	argv[ia] = NULL;
	if (!*argv[0]) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "WORKLOAD_START: empty argv[0]");
		free(arena);
		return;
	}
	struct sm_user u;
	int e = sm_resolve_user(user, &u, err, sizeof err);
	if (e) {
		sm_send_error(id, SM_E_START_FAILED, e, "%s", err);
		free(arena);
		return;
	}
	if (!has_home) {
		snprintf(at, 1024, "HOME=%s", u.home);
		env[ie++] = at;
	}
	env[ie] = NULL;

	int op[2] = { -1, -1 }, ep[2] = { -1, -1 }, xp[2] = { -1, -1 };
	struct sm_stream *s = NULL;
	if (!W.ring && !(W.ring = malloc(RING_CAP))) {
		e = ENOMEM;
		goto sys_fail;
	}
	if (pipe2(op, O_CLOEXEC) < 0 || pipe2(ep, O_CLOEXEC) < 0 || pipe2(xp, O_CLOEXEC) < 0) {
		e = errno;
		goto sys_fail;
	}
	s = sm_stream_new(id, SK_WORKLOAD);
	if (!s) {
		e = ENOMEM;
		goto sys_fail;
	}
	/* A previous workload's cgroup goes once its last process has (background ones may remain). */
	sm_cgroup_release(W.cgroup);
	W.cgroup = 0;
	if ((e = -sm_cgroup_new(&W.cgroup)))
		goto sys_fail;
	struct sm_spawn sp = { .argv = argv, .env = env, .cwd = cwd, .user = &u, .in = -1, .out = op[1],
			       .err = ep[1], .tty = -1, .errw = xp[1], .cgroup_procs = sm_cgroup_procs(W.cgroup) };
	pid_t pid = sm_spawn(&sp);
	if (sp.cgroup_procs >= 0)
		close(sp.cgroup_procs);
	if (pid < 0) {
		e = -pid;
		goto sys_fail;
	}
	close(op[1]);
	close(ep[1]);
	close(xp[1]);
	sm_dbg("workload %s started, pid %d", argv[0], (int)pid);
	free(arena);
	if (W.out >= 0)
		close(W.out); /* a previous workload's pipe still held by its background processes */
	if (W.err >= 0)
		close(W.err);
	W.head = W.tail; /* a new workload, a new log */
	W.state = WL_RUNNING;
	W.pid = pid;
	W.status = 0;
	W.out = op[0];
	W.err = ep[0];
	W.errfd = xp[0];
	W.start_stream = id;
	fcntl(W.out, F_SETFL, O_NONBLOCK);
	fcntl(W.err, F_SETFL, O_NONBLOCK);
	fcntl(W.errfd, F_SETFL, O_NONBLOCK);
	return;
sys_fail:
	for (int i = 0; i < 2; i++) {
		if (op[i] >= 0)
			close(op[i]);
		if (ep[i] >= 0)
			close(ep[i]);
		if (xp[i] >= 0)
			close(xp[i]);
	}
	free(arena);
	sm_send_error(id, SM_E_START_FAILED, e, "starting the workload: %s", strerror(e));
	if (s)
		sm_stream_close(s, 0);
}

/* The start-error pipe: a report means the child failed before exec; EOF means it exec'd. */
static void start_outcome(int reaped)
{
	int32_t rep[2];
	ssize_t r = read(W.errfd, rep, sizeof rep);
	if (r < 0 && (errno == EAGAIN || errno == EINTR) && !reaped)
		return;
	close(W.errfd);
	W.errfd = -1;
	struct sm_stream *s = W.start_stream ? sm_stream_lookup(W.start_stream) : NULL;
	W.start_stream = 0;
	if (r == (ssize_t)sizeof rep) {
		int kind = rep[0], e = rep[1];
		W.failed = W.pid;
		W.state = WL_NONE;
		W.pid = 0;
		if (s) {
			if (kind == CE_EXEC)
				sm_send_error(s->id, e == ENOENT ? SM_E_NOT_FOUND : SM_E_START_FAILED, e,
					      "starting the workload: %s", strerror(e));
			else
				sm_send_error(s->id, SM_E_START_FAILED, e, "starting the workload (%s): %s",
					      kind == CE_CWD ? "working directory" : kind == CE_USER ? "user" : "setup",
					      strerror(e));
			sm_stream_close(s, 0);
		}
		return;
	}
	if (s) {
		answer_status(s->id);
		sm_stream_close(s, 0);
	}
}

int sm_workload_reaped(pid_t pid, int status)
{
	if (pid > 0 && pid == W.failed) {
		W.failed = 0;
		return 1;
	}
	if (pid <= 0 || pid != W.pid || W.state != WL_RUNNING)
		return 0;
	if (W.errfd >= 0) {
		start_outcome(1);
		if (W.state != WL_RUNNING) {
			W.failed = 0;
			return 1;
		}
	}
	W.state = WL_EXITED;
	W.status = status;
	/* What it wrote before exiting is in the pipes now: into the ring before followers end. */
	int k = 0;
	if (W.out >= 0 && ioctl(W.out, FIONREAD, &k) == 0 && k > 0)
		drain_pipe(&W.out, 1, (uint64_t)k);
	k = 0;
	if (W.err >= 0 && ioctl(W.err, FIONREAD, &k) == 0 && k > 0)
		drain_pipe(&W.err, 2, (uint64_t)k);
	for (struct sm_stream *s = A.streams; s; s = s->next) {
		if (s->kind == SK_LOGS && ((struct logs *)s->priv)->stop == UINT64_MAX)
			((struct logs *)s->priv)->stop = W.tail;
	}
	sm_dbg("workload pid %d exited, status 0x%x", (int)pid, status);
	if (A.in_session) {
		struct sm_buf *b = sm_scratch();
		put_status(b);
		sm_send_buf(b, 0, SM_WORKLOAD_STATUS, 0);
	}
	return 1;
}

void sm_workload_kill(void)
{
	if (W.state != WL_RUNNING)
		return;
	sm_kill_tree(W.pid, W.cgroup, SIGKILL);
	kill(W.pid, SIGKILL);
}

void sm_workload_poll(int fd[3], short ev[3])
{
	fd[0] = W.errfd;
	fd[1] = W.out;
	fd[2] = W.err;
	for (int i = 0; i < 3; i++)
		ev[i] = fd[i] >= 0 ? POLLIN : 0;
}

void sm_workload_fd_event(int role, short revents)
{
	(void)revents;
	if (role == 0 && W.errfd >= 0)
		start_outcome(0);
	else if (role == 1)
		drain_pipe(&W.out, 1, 0);
	else if (role == 2)
		drain_pipe(&W.err, 2, 0);
}

/* ------------------------------------------------------------------------------------------------
 * Log streams.
 */

static void logs_open(uint32_t id, const uint8_t *p, size_t n)
{
	static const struct sm_spec spec[] = { { 1, SM_K_U8, 0 }, { 2, SM_K_U32, 0 }, { 3, SM_K_U8, 0 } };
	char err[256];
	int nf = sm_fields_split(p, n, wf, SM_MAX_FIELDS);
	if (nf < 0 || sm_fields_check(wf, nf, spec, 3, err, sizeof err)) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "WORKLOAD_LOGS: %s", nf < 0 ? "malformed fields" : err);
		return;
	}
	uint8_t mask = (uint8_t)sm_get_u(wf, nf, 3, 3);
	if (mask == 0 || mask > 3) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "WORKLOAD_LOGS: streams must be 1, 2 or 3");
		return;
	}
	struct sm_stream *s = sm_stream_new(id, SK_LOGS);
	struct logs *l = calloc(1, sizeof *l);
	if (!s || !l) {
		free(l);
		sm_send_error(id, SM_E_IO, ENOMEM, "out of memory");
		if (s)
			sm_stream_close(s, 0);
		return;
	}
	s->priv = l;
	l->pos = W.head;
	l->mask = mask;
	l->credit = sm_get_u(wf, nf, 2, SM_DEFAULT_WINDOW);
	l->stop = sm_get_u(wf, nf, 1, 0) && W.state == WL_RUNNING ? UINT64_MAX : W.tail;
	sm_logs_pump(s);
}

int sm_logs_ready(struct sm_stream *s)
{
	const struct logs *l = s->priv;
	if (s->dead || sm_output_blocked())
		return 0;
	uint64_t pos = l->pos < W.head ? W.head : l->pos;
	return pos >= l->stop || (pos < W.tail && l->credit > SM_FRAME_COST);
}

void sm_logs_pump(struct sm_stream *s)
{
	struct logs *l = s->priv;
	while (sm_logs_ready(s)) {
		if (l->pos < W.head) { /* overwritten before it was sent: skip ahead */
			l->pos = W.head;
			l->off = 0;
		}
		if (l->pos >= l->stop) {
			sm_send_buf(sm_scratch(), s->id, SM_OK, 0);
			sm_stream_close(s, 0);
			return;
		}
		uint64_t room = l->credit - SM_FRAME_COST;
		if (room > SM_CHUNK)
			room = SM_CHUNK;
		uint8_t *buf = sm_frame_alloc((size_t)room);
		if (!buf)
			return;
		size_t n = 0;
		uint8_t kind = 0;
		uint64_t end = l->stop < W.tail ? l->stop : W.tail;
		while (n < room && l->pos < end) {
			uint8_t k;
			uint32_t len;
			ring_rec(l->pos, &k, &len);
			if (!(k & l->mask) || l->off >= len) {
				l->pos += REC_HDR + len;
				l->off = 0;
				continue;
			}
			if (kind && k != kind)
				break;
			kind = k;
			size_t take = len - l->off;
			if (take > room - n)
				take = (size_t)(room - n);
			ring_out(l->pos + REC_HDR + l->off, buf + n, take);
			n += take;
			l->off += (uint32_t)take;
		}
		if (!n) {
			sm_frame_cancel(buf);
			continue; /* only records of the other stream: at the end now, or at stop */
		}
		sm_frame_commit(buf, s->id, kind == 1 ? SM_STDOUT : SM_STDERR, 0, n);
		l->credit -= n + SM_FRAME_COST;
	}
}

/* ------------------------------------------------------------------------------------------------
 * Requests.
 */

void sm_workload_open(unsigned type, uint32_t id, const uint8_t *p, size_t n)
{
	switch (type) {
	case SM_WORKLOAD_START:
		start(id, p, n);
		return;
	case SM_WORKLOAD_QUERY:
		answer_status(id);
		return;
	case SM_WORKLOAD_SIGNAL: {
		static const struct sm_spec spec[] = { { 1, SM_K_U32, SM_REQ } };
		char err[256];
		int nf = sm_fields_split(p, n, wf, SM_MAX_FIELDS);
		if (nf < 0 || sm_fields_check(wf, nf, spec, 1, err, sizeof err)) {
			sm_send_error(id, SM_E_BAD_REQUEST, 0, "WORKLOAD_SIGNAL: %s", nf < 0 ? "malformed fields" : err);
			return;
		}
		uint64_t sig = sm_get_u(wf, nf, 1, 0);
		if (sig < 1 || sig >= _NSIG) {
			sm_send_error(id, SM_E_BAD_REQUEST, 0, "WORKLOAD_SIGNAL: no signal %llu", (unsigned long long)sig);
			return;
		}
		if (W.state != WL_RUNNING) {
			sm_send_error(id, SM_E_NOT_FOUND, ESRCH, "no workload is running");
			return;
		}
		sm_kill_tree(W.pid, W.cgroup, (int)sig);
		kill(W.pid, (int)sig);
		sm_send_buf(sm_scratch(), id, SM_OK, 0);
		return;
	}
	case SM_WORKLOAD_LOGS:
		logs_open(id, p, n);
		return;
	default:
		sm_send_error(id, SM_E_UNSUPPORTED, 0, "%s does not open a stream", sm_type_name(type));
		return;
	}
}

void sm_workload_frame(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p)
{
	if (s->kind == SK_LOGS && h->type == SM_WINDOW) {
		((struct logs *)s->priv)->credit += sm_be32(p);
		return;
	}
	sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "%s on a workload stream", sm_type_name(h->type));
	sm_stream_close(s, 1);
}

void sm_workload_release(struct sm_stream *s, int abandon)
{
	(void)abandon;
	if (s->kind == SK_WORKLOAD && W.start_stream == s->id)
		W.start_stream = 0; /* the workload goes on; its status answers the question later */
	free(s->priv);
	s->priv = NULL;
}
