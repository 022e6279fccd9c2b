/* The protocol loop: channel I/O, frame dispatch, sessions, stream table, reaping, timers. */
#define _GNU_SOURCE /* splice */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* From <linux/random.h> (musl has no kernel headers). */
#ifndef RNDADDENTROPY
#define RNDADDENTROPY _IOW('R', 0x03, int[2])
#endif
#ifndef RNDRESEEDCRNG
#define RNDRESEEDCRNG _IO('R', 0x07)
#endif

struct sm_agent A = { .chan = -1, .sigfd = -1, .urandom = -1 };

/* ------------------------------------------------------------------------------------------------
 * Logging. In the VM, fd 2 is /dev/console; in host mode it is the host process's stderr.
 */

static void vlog(const char *fmt, va_list ap)
{
	char line[1024];
	int n = snprintf(line, sizeof line, "sm-init: ");
	int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
	if (m < 0)
		return;
	size_t len = (size_t)n + ((size_t)m < sizeof line - (size_t)n - 1 ? (size_t)m : sizeof line - (size_t)n - 2);
	line[len++] = '\n';
	ssize_t w = write(2, line, len);
	(void)w;
}

void sm_log(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vlog(fmt, ap);
	va_end(ap);
}

void sm_dbg(const char *fmt, ...)
{
	if (!A.debug)
		return;
	va_list ap;
	va_start(ap, fmt);
	vlog(fmt, ap);
	va_end(ap);
}

int64_t sm_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ------------------------------------------------------------------------------------------------
 * Output queue toward the host.
 */

struct oframe {
	struct oframe *next;
	size_t len;
	size_t off;
	size_t cap;
	/* >= 0: the payload is in spools[spool], not in data (see sm_frame_splice) */
	int spool;
	uint8_t data[];
};

/* Pipes of our own, each holding exactly the unsent payload of one queued frame: a process's output
 * is spliced from its pipe into one when it is pumped (so it leaves the process's pipe then, as a
 * read would take it) and from there into the channel, without passing through this process. The
 * channel is only ever handed all that such a pipe holds: virtio_console's splice_write (Linux 6.1)
 * oopses when asked for less than its source pipe holds. */
#define NSPOOL 16
static struct {
	int r, w;
	int busy;
} spools[NSPOOL];
/* Splicing failed once (the channel cannot take spliced pages, or lost some): read from then on. */
static int no_splice;

static void spool_close(int i)
{
	if (spools[i].r >= 0) {
		close(spools[i].r);
		close(spools[i].w);
	}
	spools[i].r = spools[i].w = -1;
	spools[i].busy = 0;
}

/* A free, empty spool pipe (created on first use), or -1. */
static int spool_get(void)
{
	static int init;
	if (!init) {
		for (int i = 0; i < NSPOOL; i++)
			spools[i].r = spools[i].w = -1;
		init = 1;
	}
	for (int i = 0; i < NSPOOL; i++) {
		if (spools[i].busy)
			continue;
		if (spools[i].r < 0) {
			int p[2];
			if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0)
				return -1;
			/* room for a whole chunk (a smaller pipe only makes smaller frames) */
			fcntl(p[1], F_SETPIPE_SZ, SM_CHUNK);
			spools[i].r = p[0];
			spools[i].w = p[1];
		}
		spools[i].busy = 1;
		return i;
	}
	return -1;
}

static struct oframe *oq_head, *oq_tail;

/* Large frames (process output, file data) are recycled: malloc would mmap and munmap each one. */
#define BIG_CAP (SM_HDR_SIZE + SM_CHUNK)
#define MAX_SPARE 6
static struct oframe *spare[MAX_SPARE];
static int nspare;

static struct oframe *oframe_new(size_t len)
{
	if (len > SM_HDR_SIZE + 4096 && len <= BIG_CAP) {
		if (nspare)
			return spare[--nspare];
		len = BIG_CAP;
	}
	struct oframe *f = malloc(sizeof *f + len);
	if (f) {
		f->cap = len;
		f->spool = -1;
	}
	return f;
}

static void oframe_free(struct oframe *f)
{
	if (f->spool >= 0) {
		if (f->off < f->len)
			spool_close(f->spool); /* what it still holds belongs to no frame now */
		else
			spools[f->spool].busy = 0;
		f->spool = -1;
	}
	if (f->cap == BIG_CAP && nspare < MAX_SPARE)
		spare[nspare++] = f;
	else
		free(f);
}

static void oq_append(struct oframe *f)
{
	f->next = NULL;
	f->off = 0;
	if (oq_tail)
		oq_tail->next = f;
	else
		oq_head = f;
	oq_tail = f;
	A.outq_bytes += f->len;
}

uint8_t *sm_frame_alloc(size_t payload_max)
{
	struct oframe *f = oframe_new(SM_HDR_SIZE + payload_max);
	return f ? f->data + SM_HDR_SIZE : NULL;
}

static struct oframe *frame_of(uint8_t *payload)
{
	return (struct oframe *)(void *)(payload - SM_HDR_SIZE - offsetof(struct oframe, data));
}

void sm_frame_cancel(uint8_t *payload) { oframe_free(frame_of(payload)); }
static struct sm_buf scratch;

struct sm_buf *sm_scratch(void)
{
	sm_frame_begin(&scratch);
	return &scratch;
}

int sm_output_blocked(void) { return A.outq_bytes >= SM_OUTQ_HIGH; }

static void oq_push(const uint8_t *frame, size_t len)
{
	if (!A.connected)
		return; /* nobody to send to: the next session starts with a HELLO */
	struct oframe *f = oframe_new(len);
	if (!f) {
		sm_log("out of memory queueing a frame; dropping it");
		return;
	}
	f->len = len;
	memcpy(f->data, frame, len);
	oq_append(f);
}

/* Drop queued frames; keep the head if it is partly written (unless the peer is gone). */
static void oq_drop(int keep_partial)
{
	struct oframe *f = oq_head, *keep = NULL;
	if (keep_partial && f && f->off > 0) {
		keep = f;
		f = f->next;
		keep->next = NULL;
	}
	while (f) {
		struct oframe *n = f->next;
		oframe_free(f);
		f = n;
	}
	oq_head = oq_tail = keep;
	A.outq_bytes = keep ? keep->len - keep->off : 0;
}

static void log_frame(const char *dir, uint32_t stream, unsigned type, unsigned flags, size_t len)
{
	sm_dbg("%s %s stream=%u len=%zu%s", dir, sm_type_name(type), stream, len, (flags & SM_FLAG_FIN) ? " FIN" : "");
}

void sm_send(uint32_t stream, uint8_t type, uint8_t flags, const void *p, size_t n)
{
	uint8_t stack[SM_HDR_SIZE + 256];
	uint8_t *buf = n <= 256 ? stack : malloc(SM_HDR_SIZE + n);
	if (!buf)
		return;
	struct sm_hdr h = { (uint32_t)n, stream, type, flags };
	sm_hdr_encode(buf, &h);
	if (n)
		memcpy(buf + SM_HDR_SIZE, p, n);
	log_frame(">", stream, type, flags, n);
	oq_push(buf, SM_HDR_SIZE + n);
	if (buf != stack)
		free(buf);
}

void sm_frame_commit(uint8_t *payload, uint32_t stream, uint8_t type, uint8_t flags, size_t n)
{
	struct oframe *f = frame_of(payload);
	if (!A.connected) {
		oframe_free(f);
		return;
	}
	struct sm_hdr h = { (uint32_t)n, stream, type, flags };
	sm_hdr_encode(f->data, &h);
	f->len = SM_HDR_SIZE + n;
	log_frame(">", stream, type, flags, n);
	oq_append(f);
}

ssize_t sm_frame_splice(uint8_t *payload, uint32_t stream, uint8_t type, int fd, size_t max)
{
	struct oframe *f = frame_of(payload);
	if (!A.connected || no_splice || max > f->cap - SM_HDR_SIZE)
		return -2;
	int i = spool_get();
	if (i < 0)
		return -2;
	ssize_t r = splice(fd, NULL, spools[i].w, NULL, max, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
	if (r <= 0) {
		int e = errno;
		spools[i].busy = 0; /* nothing moved: it is still empty */
		if (r < 0 && e != EAGAIN && e != EINTR)
			return -2; /* not a pipe, or no memory: read it */
		errno = e;
		return r;
	}
	f->spool = i;
	sm_frame_commit(payload, stream, type, 0, (size_t)r); /* connected: checked above */
	return r;
}

void sm_send_buf(struct sm_buf *b, uint32_t stream, uint8_t type, uint8_t flags)
{
	size_t len = sm_frame_end(b, stream, type, flags);
	if (!len) {
		sm_log("internal: frame %s too large", sm_type_name(type));
		return;
	}
	log_frame(">", stream, type, flags, len - SM_HDR_SIZE);
	oq_push(b->data, len);
}

/* Make an arbitrary message a valid protocol string: no NUL, valid UTF-8, at most 4096 bytes. */
static void sanitize(char *s)
{
	size_t n = strlen(s);
	if (n > 4096)
		s[n = 4096] = 0;
	if (!sm_utf8_valid((const uint8_t *)s, n))
		for (size_t k = 0; k < n; k++)
			if ((unsigned char)s[k] >= 0x80)
				s[k] = '?';
}

void sm_send_error(uint32_t stream, uint32_t code, int err, const char *fmt, ...)
{
	char msg[4097];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	sanitize(msg);
	sm_dbg("error on stream %u: code %u errno %d: %s", stream, code, err, msg);
	struct sm_buf *b = sm_scratch();
	sm_put_u32(b, 1, code);
	if (err > 0)
		sm_put_u32(b, 2, (uint32_t)err);
	sm_put_str(b, 3, msg);
	sm_send_buf(b, stream, SM_ERROR, 0);
}

void sm_send_window(uint32_t stream, uint32_t n)
{
	uint8_t v[4];
	sm_put32(v, n);
	sm_send(stream, SM_WINDOW, 0, v, 4);
}

/* ------------------------------------------------------------------------------------------------
 * Stream table.
 */

#define NBUCKETS 1024u
static struct sm_stream *buckets[NBUCKETS];

struct sm_stream *sm_stream_lookup(uint32_t id)
{
	for (struct sm_stream *s = buckets[id % NBUCKETS]; s; s = s->hnext)
		if (s->id == id)
			return s;
	return NULL;
}

struct sm_stream *sm_stream_new(uint32_t id, int kind)
{
	struct sm_stream *s = calloc(1, sizeof *s);
	if (!s)
		return NULL;
	s->id = id;
	s->kind = kind;
	s->rfd = s->errfd = -1;
	s->in_w = s->out_r = s->err_r = s->ptm = -1;
	s->in_r_keep = s->out_w_keep = s->err_w_keep = s->pts_keep = -1;
	s->w.fd = -1;
	s->hnext = buckets[id % NBUCKETS];
	buckets[id % NBUCKETS] = s;
	s->next = A.streams;
	if (A.streams)
		A.streams->prev = s;
	A.streams = s;
	A.nstreams++;
	return s;
}

void sm_stream_close(struct sm_stream *s, int abandon)
{
	if (s->dead)
		return;
	s->dead = 1;
	struct sm_stream **pp = &buckets[s->id % NBUCKETS];
	while (*pp && *pp != s)
		pp = &(*pp)->hnext;
	if (*pp)
		*pp = s->hnext;
	if (s->prev)
		s->prev->next = s->next;
	else
		A.streams = s->next;
	if (s->next)
		s->next->prev = s->prev;
	A.nstreams--;
	switch (s->kind) {
	case SK_EXEC: sm_exec_release(s, abandon); break;
	case SK_FS: sm_fs_release(s, abandon); break;
	case SK_WATCH: sm_watch_release(s, abandon); break;
	case SK_TCP: sm_tcp_release(s, abandon); break;
	case SK_WORKLOAD: case SK_LOGS: sm_workload_release(s, abandon); break;
	default: sm_file_release(s, abandon); break;
	}
	s->gnext = A.graveyard;
	A.graveyard = s;
}

void sm_kill_all_streams(void)
{
	while (A.streams)
		sm_stream_close(A.streams, 1);
}

/* Process groups to SIGKILL later (timeout grace after the stream has ended). */
#define MAX_PENDING 1024
static struct {
	pid_t pgid;
	uint32_t cgroup;
	int64_t at;
} pending[MAX_PENDING];
static int npending;

static void kill_pending(int i)
{
	sm_kill_tree(pending[i].pgid, pending[i].cgroup, SIGKILL);
	sm_cgroup_release(pending[i].cgroup);
}

void sm_add_pending_kill(pid_t pgid, uint32_t cgroup, int64_t at_ns)
{
	if (npending == MAX_PENDING) {
		sm_kill_tree(pgid, cgroup, SIGKILL);
		sm_cgroup_release(cgroup);
		return;
	}
	pending[npending].pgid = pgid;
	pending[npending].cgroup = cgroup;
	pending[npending].at = at_ns;
	npending++;
}

/* Host mode: every process group we created, to kill them all when the channel closes. */
#define MAX_REMEMBERED 4096
static pid_t remembered[MAX_REMEMBERED];
static unsigned nremembered;

void sm_remember_pgid(pid_t pgid)
{
	if (A.host_mode)
		remembered[nremembered++ % MAX_REMEMBERED] = pgid;
}

static void host_exit(int code)
{
	sm_kill_all_streams();
	sm_workload_kill();
	unsigned n = nremembered < MAX_REMEMBERED ? nremembered : MAX_REMEMBERED;
	for (unsigned i = 0; i < n; i++)
		kill(-remembered[i], SIGKILL);
	for (int i = 0; i < npending; i++)
		kill_pending(i);
	_exit(code);
}

/* ------------------------------------------------------------------------------------------------
 * Channel.
 */

static uint8_t inbuf[SM_HDR_SIZE + SM_MAX_PAYLOAD];
static size_t in_start, in_end;

/* VM mode: SIGIO on the port only while the host is away. The driver raises it when the host opens
 * or closes the port, but also for every buffer that arrives, which is noise while connected. */
static void chan_async(int on)
{
	int fl = fcntl(A.chan, F_GETFL);
	if (fl >= 0)
		fcntl(A.chan, F_SETFL, on ? fl | O_ASYNC : fl & ~O_ASYNC);
}

static void chan_disconnected(void)
{
	if (A.host_mode) {
		sm_dbg("channel closed; exiting");
		host_exit(0);
	}
	if (A.connected)
		sm_log("host disconnected; waiting for it to reconnect");
	A.connected = 0;
	A.reading = 1;
	in_start = in_end = 0;
	oq_drop(0);
	chan_async(1);
}

/* VM mode: is the host connected to the port? (virtio-serial reports POLLHUP while it is not.) */
static void chan_check_connected(void)
{
	if (A.connected || A.host_mode)
		return;
	struct pollfd p = { .fd = A.chan, .events = POLLIN };
	if (poll(&p, 1, 0) < 0)
		return;
	/* Still away. (What the previous connection left was read up to EOF before we got here; any
	 * byte arriving from now on belongs to the next connection, so nothing is discarded.) */
	if (p.revents & POLLHUP)
		return;
	sm_dbg("host connected");
	chan_async(0);
	A.connected = 1;
	A.reading = 1;
	in_start = in_end = 0;
}

void sm_chan_flush(void);

/* The virtio console port makes every write() (and every element of a writev()) a buffer of its
 * own, which QEMU passes on, and the host reads, by itself: frames queued together that fit in
 * one write (an exec's STDOUT FIN, STDERR FIN and EXIT) are copied into one, so the host wakes
 * once for them. The port takes at most 32 KiB per write. */
#define COALESCE_BYTES 32768u
static uint8_t coalesced[COALESCE_BYTES];

/* What of a queued frame a write can send: all of it, or a spooled frame's header (its payload
 * follows by splice). */
static size_t sendable(const struct oframe *f)
{
	return (f->spool >= 0 ? SM_HDR_SIZE : f->len) - f->off;
}

/* Fills `iov` with what the next write sends, whole frames up to and including the header of the
 * first spooled one; returns the number of elements. */
static int next_write(struct iovec iov[64])
{
	size_t total = 0;
	int n = 0;
	for (struct oframe *f = oq_head; f && n < 64 && total + sendable(f) <= COALESCE_BYTES; f = f->next) {
		total += sendable(f);
		n++;
		if (f->spool >= 0)
			break;
	}
	if (n >= 2) {
		size_t at = 0;
		struct oframe *f = oq_head;
		for (int i = 0; i < n; i++, f = f->next) {
			memcpy(coalesced + at, f->data + f->off, sendable(f));
			at += sendable(f);
		}
		iov[0].iov_base = coalesced;
		iov[0].iov_len = total;
		return 1;
	}
	int k = 0;
	for (struct oframe *f = oq_head; f && k < 64; f = f->next) {
		iov[k].iov_base = f->data + f->off;
		iov[k++].iov_len = sendable(f);
		if (f->spool >= 0)
			break;
	}
	return k;
}

static void oq_pop(void)
{
	struct oframe *f = oq_head;
	oq_head = f->next;
	if (!oq_head)
		oq_tail = NULL;
	oframe_free(f);
}

/* The head frame's spool pipe cannot go to the channel: read what it holds into the frame's own
 * buffer and send it from there (and read process output from now on). */
static void unspool(struct oframe *f, int err)
{
	sm_log("splicing output into the channel failed (%s); reading it instead", err ? strerror(err) : "no progress");
	no_splice = 1;
	int fd = spools[f->spool].r;
	size_t at = f->off;
	while (at < f->len) {
		ssize_t r = read(fd, f->data + at, f->len - at);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		at += (size_t)r;
	}
	if (at < f->len) {
		/* virtio_console takes the pages before it fails to queue them: keep the framing */
		sm_log("lost %zu bytes of stream %u's output in the channel; sent as zeros", f->len - at,
		       sm_be32(f->data + 4));
		memset(f->data + at, 0, f->len - at);
	}
	spool_close(f->spool);
	f->spool = -1;
}

/* Send some of the head frame's spooled payload. Returns 1 on progress, 0 when the channel is full. */
static int flush_spool(void)
{
	struct oframe *f = oq_head;
	ssize_t w = splice(spools[f->spool].r, NULL, A.chan, NULL, f->len - f->off, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
	if (w > 0) {
		f->off += (size_t)w;
		A.outq_bytes -= (size_t)w;
		if (f->off == f->len)
			oq_pop();
		return 1;
	}
	if (w < 0 && errno == EINTR)
		return 1;
	if (w < 0 && errno == EAGAIN)
		return 0;
	unspool(f, w < 0 ? errno : 0);
	return 1;
}

void sm_chan_flush(void)
{
	while (oq_head && A.connected) {
		if (oq_head->spool >= 0 && oq_head->off >= SM_HDR_SIZE) {
			if (!flush_spool())
				return;
			continue;
		}
		struct iovec iov[64];
		int k = next_write(iov);
		ssize_t w = writev(A.chan, iov, k);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return;
			sm_dbg("channel write: %s", strerror(errno));
			chan_disconnected();
			return;
		}
		A.outq_bytes -= (size_t)w;
		while (w > 0) {
			struct oframe *f = oq_head;
			size_t left = sendable(f);
			if ((size_t)w < left) {
				f->off += (size_t)w;
				break;
			}
			w -= (ssize_t)left;
			f->off += left;
			if (f->off < f->len)
				break; /* a spooled frame's header: its payload follows by splice */
			oq_pop();
		}
	}
}

void sm_chan_flush_blocking(int timeout_ms)
{
	int64_t end = sm_now_ns() + (int64_t)timeout_ms * 1000000;
	for (;;) {
		sm_chan_flush();
		if (!oq_head || !A.connected)
			return;
		int64_t left = (end - sm_now_ns()) / 1000000;
		if (left <= 0)
			return;
		struct pollfd p = { .fd = A.chan, .events = POLLOUT };
		if (poll(&p, 1, (int)left) < 0 && errno != EINTR)
			return;
	}
}

static void bad_frame(const char *why)
{
	sm_log("bad frame from the host: %s; ignoring the channel until the host reconnects", why);
	sm_send_error(0, SM_E_BAD_FRAME, 0, "bad frame: %s", why);
	if (A.host_mode) {
		sm_chan_flush_blocking(1000);
		host_exit(1);
	}
	A.reading = 0;
	in_start = in_end = 0;
}

/* ------------------------------------------------------------------------------------------------
 * Control stream.
 */

static struct sm_field fields[SM_MAX_FIELDS];

static void add_entropy(const uint8_t *p, uint32_t n)
{
	if (A.urandom < 0)
		A.urandom = open("/dev/urandom", O_RDWR | O_CLOEXEC);
	if (A.urandom < 0) {
		sm_log("cannot open /dev/urandom: %s", strerror(errno));
		return;
	}
	struct {
		int entropy_count;
		int buf_size;
		uint8_t buf[512];
	} info;
	info.entropy_count = (int)n * 8;
	info.buf_size = (int)n;
	memcpy(info.buf, p, n);
	if (ioctl(A.urandom, RNDADDENTROPY, &info) < 0)
		sm_log("RNDADDENTROPY: %s", strerror(errno));
	if (ioctl(A.urandom, RNDRESEEDCRNG) < 0)
		sm_log("RNDRESEEDCRNG: %s", strerror(errno));
	explicit_bzero(&info, sizeof info);
}

static void on_hello(const uint8_t *p, size_t n)
{
	static const struct sm_spec spec[] = {
		{ 1, SM_K_U32, SM_REQ },
		{ 2, SM_K_U64, SM_REQ },
		{ 3, SM_K_U64, 0 },
		{ 4, SM_K_BYTES, 0 },
		{ 7, SM_K_STRING, 0 },
		{ 8, SM_K_STRING, 0 },
	};
	char err[256];
	int nf = sm_fields_split(p, n, fields, SM_MAX_FIELDS);
	if (nf < 0) {
		sm_send_error(0, SM_E_BAD_REQUEST, 0, "HELLO: malformed fields");
		return;
	}
	if (sm_fields_check(fields, nf, spec, sizeof spec / sizeof spec[0], err, sizeof err)) {
		sm_send_error(0, SM_E_BAD_REQUEST, 0, "HELLO: %s", err);
		return;
	}
	const struct sm_field *ent = sm_find(fields, nf, 4);
	if (ent && (ent->len < 32 || ent->len > 512)) {
		sm_send_error(0, SM_E_BAD_REQUEST, 0, "HELLO: entropy must be 32-512 bytes, got %u", ent->len);
		return;
	}
	uint32_t version = (uint32_t)sm_get_u(fields, nf, 1, 0);
	uint64_t epoch = sm_get_u(fields, nf, 2, 0);

	/* A new session: abandon the previous one and anything still queued for it. */
	sm_kill_all_streams();
	oq_drop(1);
	A.in_session = 0;
	A.max_stream = 0;
	if (version != SM_PROTO_VERSION) {
		sm_send_error(0, SM_E_VERSION, 0, "the agent speaks protocol version %u, the host %u", SM_PROTO_VERSION,
			      version);
		return;
	}
	if (!A.host_mode) {
		const struct sm_field *t = sm_find(fields, nf, 3);
		if (t) {
			uint64_t ns = sm_uval(t);
			struct timespec ts = { (time_t)(ns / 1000000000u), (long)(ns % 1000000000u) };
			if (clock_settime(CLOCK_REALTIME, &ts) < 0)
				sm_log("clock_settime: %s", strerror(errno));
		}
		if (ent)
			add_entropy(ent->val, ent->len);
		/* The clone's own names (its own machine-id), before any of its processes runs a step */
		const struct sm_field *id = sm_find(fields, nf, 7), *name = sm_find(fields, nf, 8);
		char idz[33], namez[65];
		if (id && sm_machine_id_valid(id->val, id->len))
			snprintf(idz, sizeof idz, "%.*s", (int)id->len, (const char *)id->val);
		else
			id = NULL;
		if (name && sm_hostname_valid(name->val, name->len))
			snprintf(namez, sizeof namez, "%.*s", (int)name->len, (const char *)name->val);
		else
			name = NULL;
		if (id || name)
			sm_runtime_identity(name ? namez : NULL, id ? idz : NULL);
		/* A snapshot is saved with every process the agent started frozen (FREEZE): they run
		 * again only now, with the clone's clock, entropy and names in place. */
		int e = sm_cgroup_freeze(0);
		if (e < 0)
			sm_log("thawing the guest's processes: %s", strerror(-e));
	}
	A.epoch = epoch;
	A.in_session = 1;
	struct timespec bt;
	clock_gettime(CLOCK_BOOTTIME, &bt);
	struct sm_buf *b = sm_scratch();
	sm_put_u32(b, 1, SM_PROTO_VERSION);
	sm_put_u64(b, 2, epoch);
	sm_put_str(b, 5, SM_AGENT_NAME);
	sm_put_u64(b, 6, (uint64_t)bt.tv_sec * 1000000000u + (uint64_t)bt.tv_nsec);
	sm_send_buf(b, 0, SM_HELLO, 0);
	sm_dbg("session started, epoch %llu", (unsigned long long)epoch);
}

/* FREEZE: before a snapshot is saved, so that no process of the snapshot runs again before a
 * clone's HELLO; thawed by the next HELLO or a FREEZE with 0. */
static void on_freeze(uint32_t id, const uint8_t *p, size_t n)
{
	static const struct sm_spec spec[] = { { 1, SM_K_U8, SM_REQ } };
	char err[256];
	int nf = sm_fields_split(p, n, fields, SM_MAX_FIELDS);
	if (nf < 0 || sm_fields_check(fields, nf, spec, 1, err, sizeof err)) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "FREEZE: %s", nf < 0 ? "malformed fields" : err);
		return;
	}
	uint64_t frozen = sm_get_u(fields, nf, 1, 0);
	if (frozen > 1) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "FREEZE: frozen must be 0 or 1");
		return;
	}
	int e = sm_cgroup_freeze((int)frozen);
	if (e < 0) {
		sm_send_error(id, SM_E_IO, (uint32_t)-e, "FREEZE: %s", strerror(-e));
		return;
	}
	sm_send_buf(sm_scratch(), id, SM_OK, 0);
}

static void on_shutdown(void)
{
	sm_log("shutdown requested");
	if (A.host_mode) {
		sm_kill_all_streams();
		sm_workload_kill();
		struct sm_buf *b = sm_scratch();
		sm_send_buf(b, 0, SM_OK, 0);
		sm_chan_flush_blocking(2000);
		host_exit(0);
	}
	sm_kill_all_streams();
	sm_shutdown_vm();
	struct sm_buf *b = sm_scratch();
	sm_send_buf(b, 0, SM_OK, 0);
	sm_chan_flush_blocking(1000);
	sm_poweroff();
}

/* ------------------------------------------------------------------------------------------------
 * Dispatch.
 */

/* Answer a bad frame with ERROR `code` on the stream it belongs to: stream 0 for control frames and
 * unknown streams, the (new or live) stream otherwise, which that ends. Frames for streams that
 * have already ended are ignored: they were in flight. */
static void reject(const struct sm_hdr *h, uint32_t code, const char *msg)
{
	if (h->stream == 0) {
		sm_send_error(0, code, 0, "%s: %s", sm_type_name(h->type), msg);
		return;
	}
	struct sm_stream *s = sm_stream_lookup(h->stream);
	if (s) {
		sm_send_error(h->stream, code, 0, "%s: %s", sm_type_name(h->type), msg);
		sm_stream_close(s, 1);
		return;
	}
	if (h->stream <= A.max_stream)
		return;
	if (sm_type_opens_stream(h->type) || !sm_type_known(h->type)) {
		A.max_stream = h->stream; /* a new stream, ended by this error */
		sm_send_error(h->stream, code, 0, "%s: %s", sm_type_name(h->type), msg);
		return;
	}
	sm_send_error(0, code, 0, "%s for stream %u: %s", sm_type_name(h->type), h->stream, msg);
}

static void on_frame(const struct sm_hdr *h, const uint8_t *p)
{
	char err[256];
	log_frame("<", h->stream, h->type, h->flags, h->length);
	unsigned t = h->type;
	if (!sm_type_from_host(t)) {
		int known = sm_type_known(t);
		snprintf(err, sizeof err, "message type 0x%02x %s", t, known ? "is not sent by the host" : "is not supported");
		if (!A.in_session && t != SM_HELLO)
			sm_send_error(0, known ? SM_E_BAD_REQUEST : SM_E_UNSUPPORTED, 0, "%s", err);
		else
			reject(h, known ? SM_E_BAD_REQUEST : SM_E_UNSUPPORTED, err);
		return;
	}
	int control = t == SM_HELLO || t == SM_PING || t == SM_SHUTDOWN;
	if (control != (h->stream == 0)) {
		sm_send_error(0, SM_E_BAD_REQUEST, 0, "%s on stream %u: %s", sm_type_name(t), h->stream,
			      control ? "it belongs on stream 0" : "it needs a stream other than 0");
		return;
	}
	if (t != SM_HELLO && !A.in_session) {
		sm_send_error(0, SM_E_BAD_REQUEST, 0, "%s before HELLO", sm_type_name(t));
		return;
	}
	int opening = sm_type_opens_stream(t);
	if (opening && h->stream <= A.max_stream) {
		sm_send_error(0, SM_E_BAD_REQUEST, 0, "%s: stream id %u was already used (ids must increase)",
			      sm_type_name(t), h->stream);
		return;
	}
	struct sm_stream *s = opening ? NULL : sm_stream_lookup(h->stream);
	if (!opening && !control && !s) {
		if (h->stream > A.max_stream)
			sm_send_error(0, SM_E_BAD_REQUEST, 0, "%s for stream %u, which was never opened",
				      sm_type_name(t), h->stream);
		return; /* otherwise the stream has ended: frames still in flight are ignored */
	}
	if (sm_msg_check(t, 1, p, h->length, err, sizeof err)) {
		reject(h, SM_E_BAD_REQUEST, err);
		return;
	}
	if ((h->flags & SM_FLAG_FIN) && !sm_type_takes_fin(t)) {
		reject(h, SM_E_BAD_REQUEST, "FIN is only meaningful on data messages");
		return;
	}
	switch (t) {
	case SM_HELLO:
		on_hello(p, h->length);
		return;
	case SM_PING:
		sm_send(0, SM_PONG, 0, p, h->length);
		return;
	case SM_SHUTDOWN:
		on_shutdown();
		return;
	default:
		break;
	}
	if (opening) {
		A.max_stream = h->stream;
		if (A.nstreams >= SM_MAX_STREAMS) {
			sm_send_error(h->stream, SM_E_BAD_REQUEST, 0, "too many open streams (%u)", SM_MAX_STREAMS);
			return;
		}
		switch (t) {
		case SM_EXEC: sm_exec_open(h->stream, p, h->length); break;
		case SM_WRITE_FILE: sm_write_open(h->stream, p, h->length); break;
		case SM_READ_FILE: sm_read_open(h->stream, p, h->length); break;
		case SM_FS: sm_fs_open(h->stream, p, h->length); break;
		case SM_WATCH: sm_watch_open(h->stream, p, h->length); break;
		case SM_TCP_CONNECT: sm_tcp_open(h->stream, p, h->length); break;
		case SM_FREEZE: on_freeze(h->stream, p, h->length); break;
		default: sm_workload_open(t, h->stream, p, h->length); break;
		}
		return;
	}
	if (t == SM_RESET) {
		sm_dbg("stream %u reset by the host", s->id);
		sm_stream_close(s, 1);
		return;
	}
	switch (s->kind) {
	case SK_EXEC: sm_exec_frame(s, h, p); break;
	case SK_FS: sm_fs_frame(s, h, p); break;
	case SK_WATCH: sm_watch_frame(s, h, p); break;
	case SK_TCP: sm_tcp_frame(s, h, p); break;
	case SK_WORKLOAD: case SK_LOGS: sm_workload_frame(s, h, p); break;
	default: sm_file_frame(s, h, p); break;
	}
}

static void chan_read(void)
{
	/* A virtio-serial read returns at most one buffer (a page): keep reading until EAGAIN, up to
	 * 2 MiB per call so that the other fds get their turn. */
	size_t total = 0;
	while (A.reading && A.connected && total < (2u << 20)) {
		if (in_start == in_end)
			in_start = in_end = 0;
		size_t space = sizeof inbuf - in_end;
		if (space == 0)
			return; /* cannot happen: a whole frame always fits */
		ssize_t r = read(A.chan, inbuf + in_end, space);
		if (r == 0) {
			chan_disconnected();
			return;
		}
		if (r < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return;
			sm_dbg("channel read: %s", strerror(errno));
			chan_disconnected();
			return;
		}
		in_end += (size_t)r;
		total += (size_t)r;
		while (A.reading && A.connected && in_end - in_start >= SM_HDR_SIZE) {
			struct sm_hdr h;
			if (sm_hdr_decode(inbuf + in_start, &h)) {
				char why[96];
				if (h.length > SM_MAX_PAYLOAD)
					snprintf(why, sizeof why, "payload length %u exceeds %u", h.length, SM_MAX_PAYLOAD);
				else
					snprintf(why, sizeof why, "reserved flag bits set (0x%02x)", h.flags);
				bad_frame(why);
				return;
			}
			if (in_end - in_start < SM_HDR_SIZE + h.length)
				break;
			size_t at = in_start;
			in_start += SM_HDR_SIZE + h.length;
			on_frame(&h, inbuf + at + SM_HDR_SIZE);
			if (A.outq_bytes >= SM_OUTQ_HARD)
				break;
		}
		if (in_start > 0 && in_start < in_end) {
			memmove(inbuf, inbuf + in_start, in_end - in_start);
			in_end -= in_start;
			in_start = 0;
		}
		if (A.outq_bytes >= SM_OUTQ_HARD)
			return;
	}
}

/* Frames already buffered but not yet parsed (parsing stops while the output queue is full). */
static int chan_has_buffered_frame(void)
{
	if (!A.reading || !A.connected || in_end - in_start < SM_HDR_SIZE)
		return 0;
	struct sm_hdr h;
	if (sm_hdr_decode(inbuf + in_start, &h))
		return 1;
	return in_end - in_start >= SM_HDR_SIZE + h.length;
}

static void chan_parse_buffered(void)
{
	while (A.outq_bytes < SM_OUTQ_HARD && chan_has_buffered_frame()) {
		struct sm_hdr h;
		if (sm_hdr_decode(inbuf + in_start, &h)) {
			bad_frame("reserved flag bits or oversized payload");
			return;
		}
		size_t at = in_start;
		in_start += SM_HDR_SIZE + h.length;
		on_frame(&h, inbuf + at + SM_HDR_SIZE);
	}
}

/* ------------------------------------------------------------------------------------------------
 * Signals and children.
 */

static void reap(void)
{
	for (;;) {
		int status;
		struct rusage ru;
		pid_t pid = wait4(-1, &status, WNOHANG, &ru);
		if (pid <= 0)
			return;
		if (sm_workload_reaped(pid, status))
			continue;
		for (struct sm_stream *s = A.streams; s; s = s->next) {
			if (s->kind == SK_EXEC && s->pid == pid && (s->state == X_STARTING || s->state == X_RUNNING)) {
				sm_exec_reaped(s, status, &ru);
				break;
			}
		}
	}
}

static void on_signals(void)
{
	struct signalfd_siginfo si[16];
	for (;;) {
		ssize_t r = read(A.sigfd, si, sizeof si);
		if (r <= 0)
			return;
		for (size_t i = 0; i < (size_t)r / sizeof si[0]; i++) {
			switch (si[i].ssi_signo) {
			case SIGCHLD:
				reap();
				break;
			case SIGIO:
				chan_check_connected();
				break;
			case SIGTERM: case SIGINT: case SIGHUP:
				if (A.host_mode) {
					sm_dbg("signal %u; exiting", si[i].ssi_signo);
					host_exit(0);
				}
				break;
			default:
				break;
			}
		}
	}
}

/* ------------------------------------------------------------------------------------------------
 * Main loop.
 */

struct ptag {
	struct sm_stream *s;
	int role;
};

/* Which fds a stream wants polled (roles 0-3); see sm_exec_poll. */
static void stream_poll(struct sm_stream *s, int fd[4], short ev[4])
{
	for (int i = 0; i < 4; i++) {
		fd[i] = -1;
		ev[i] = 0;
	}
	switch (s->kind) {
	case SK_EXEC: sm_exec_poll(s, fd, ev); break;
	case SK_WATCH: sm_watch_poll(s, fd, ev); break;
	case SK_TCP: sm_tcp_poll(s, fd, ev); break;
	default: break;
	}
}

static void stream_fd_event(struct sm_stream *s, int role, short revents)
{
	switch (s->kind) {
	case SK_EXEC: sm_exec_fd_event(s, role, revents); break;
	case SK_WATCH: sm_watch_event(s, role, revents); break;
	case SK_TCP: sm_tcp_event(s, role, revents); break;
	default: break;
	}
}

/* Output that needs no fd (file reads, directory listings, logs from the ring). */
static int stream_ready(struct sm_stream *s)
{
	switch (s->kind) {
	case SK_READ: return sm_read_ready(s);
	case SK_FS: return sm_fs_ready(s);
	case SK_LOGS: return sm_logs_ready(s);
	default: return 0;
	}
}

static void stream_pump(struct sm_stream *s)
{
	switch (s->kind) {
	case SK_READ: sm_read_pump(s); break;
	case SK_FS: sm_fs_pump(s); break;
	case SK_LOGS: sm_logs_pump(s); break;
	default: break;
	}
}

int sm_agent_run(int chan_fd, int host_mode, int debug)
{
	A.chan = chan_fd;
	A.host_mode = host_mode;
	A.debug = debug;
	A.reading = 1;

	signal(SIGPIPE, SIG_IGN);
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	sigaddset(&set, SIGIO);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	sigprocmask(SIG_BLOCK, &set, NULL);
	A.sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	if (A.sigfd < 0) {
		sm_log("signalfd: %s", strerror(errno));
		return 1;
	}

	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
		A.nofile_soft = rl.rlim_cur;
		A.nofile_hard = rl.rlim_max;
		struct rlimit want = rl;
		if (!host_mode && want.rlim_max < 65536)
			want.rlim_max = 65536;
		want.rlim_cur = want.rlim_max < 65536 ? want.rlim_max : 65536;
		if (setrlimit(RLIMIT_NOFILE, &want) < 0) {
			want.rlim_max = rl.rlim_max;
			want.rlim_cur = rl.rlim_max < 65536 ? rl.rlim_max : 65536;
			setrlimit(RLIMIT_NOFILE, &want);
		}
	}

	sm_cgroup_init();
	int fl = fcntl(chan_fd, F_GETFL);
	fcntl(chan_fd, F_SETFL, fl | O_NONBLOCK);
	fcntl(chan_fd, F_SETFD, FD_CLOEXEC);
	if (host_mode) {
		A.connected = 1;
	} else {
		/* The virtio-serial driver sends SIGIO when the host opens or closes the port. */
		fcntl(chan_fd, F_SETOWN, getpid());
		chan_async(1);
		chan_check_connected();
		if (!A.connected)
			sm_log("waiting for the host to connect");
	}

	struct pollfd *pfd = NULL;
	struct ptag *tag = NULL;
	size_t cap = 0;
	for (;;) {
		size_t need = 5 + 4 * (size_t)A.nstreams;
		if (need > cap) {
			cap = need * 2;
			pfd = realloc(pfd, cap * sizeof *pfd);
			tag = realloc(tag, cap * sizeof *tag);
			if (!pfd || !tag) {
				sm_log("out of memory");
				return 1;
			}
		}
		size_t n = 0;
		pfd[n] = (struct pollfd){ .fd = A.sigfd, .events = POLLIN };
		tag[n++] = (struct ptag){ NULL, -1 };
		int chan_idx = -1;
		if (A.connected) {
			short ev = 0;
			if (A.reading && A.outq_bytes < SM_OUTQ_HARD)
				ev |= POLLIN;
			if (oq_head)
				ev |= POLLOUT;
			chan_idx = (int)n;
			pfd[n] = (struct pollfd){ .fd = A.chan, .events = ev };
			tag[n++] = (struct ptag){ NULL, -2 };
		}
		{
			int wfd[3];
			short wev[3];
			sm_workload_poll(wfd, wev);
			for (int r = 0; r < 3; r++) {
				if (wfd[r] < 0 || !wev[r])
					continue;
				pfd[n] = (struct pollfd){ .fd = wfd[r], .events = wev[r] };
				tag[n++] = (struct ptag){ NULL, r };
			}
		}
		int64_t now = sm_now_ns();
		int64_t next = -1;
		int pump = 0;
		for (struct sm_stream *s = A.streams; s; s = s->next) {
			int fd[4];
			short ev[4];
			stream_poll(s, fd, ev);
			for (int r = 0; r < 4; r++) {
				if (fd[r] < 0 || !ev[r])
					continue;
				pfd[n] = (struct pollfd){ .fd = fd[r], .events = ev[r] };
				tag[n++] = (struct ptag){ s, r };
			}
			if (s->kind == SK_EXEC) {
				int64_t t = sm_exec_next_timer(s);
				if (t >= 0 && (next < 0 || t < next))
					next = t;
			} else if (stream_ready(s)) {
				pump = 1;
			}
		}
		for (int i = 0; i < npending; i++)
			if (next < 0 || pending[i].at < next)
				next = pending[i].at;
		int timeout = -1;
		if (pump || (chan_has_buffered_frame() && A.outq_bytes < SM_OUTQ_HARD))
			timeout = 0;
		else if (next >= 0)
			timeout = next <= now ? 0 : (int)((next - now + 999999) / 1000000);
		if (!A.connected && !A.host_mode && (timeout < 0 || timeout > 1000))
			timeout = 1000; /* SIGIO should tell us; check now and then anyway */

		int r = poll(pfd, n, timeout);
		if (r < 0 && errno != EINTR) {
			sm_log("poll: %s", strerror(errno));
			return 1;
		}
		if (r > 0) {
			if (pfd[0].revents)
				on_signals();
			for (size_t i = 1; i < n; i++) {
				if (!pfd[i].revents || (int)i == chan_idx)
					continue;
				if (!tag[i].s)
					sm_workload_fd_event(tag[i].role, pfd[i].revents);
				else if (!tag[i].s->dead)
					stream_fd_event(tag[i].s, tag[i].role, pfd[i].revents);
			}
			if (chan_idx >= 0 && A.connected && pfd[chan_idx].revents) {
				short re = pfd[chan_idx].revents;
				if (re & POLLOUT)
					sm_chan_flush();
				if (A.connected && (re & POLLIN) && A.reading)
					chan_read();
				else if (A.connected && (re & (POLLHUP | POLLERR))) {
					/* Not reading (after a bad frame) or hung up: drain and detect the disconnect. */
					char junk[4096];
					ssize_t k;
					while ((k = read(A.chan, junk, sizeof junk)) > 0)
						;
					if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR))
						chan_disconnected();
				}
			}
		}
		chan_parse_buffered();
		now = sm_now_ns();
		for (struct sm_stream *s = A.streams, *nx; s; s = nx) {
			nx = s->next;
			if (s->kind == SK_EXEC)
				sm_exec_timers(s, now);
		}
		for (int i = 0; i < npending;) {
			if (pending[i].at <= now) {
				kill_pending(i);
				pending[i] = pending[--npending];
			} else {
				i++;
			}
		}
		for (struct sm_stream *s = A.streams, *nx; s; s = nx) {
			nx = s->next;
			if (stream_ready(s))
				stream_pump(s);
		}
		if (!A.connected && !A.host_mode)
			chan_check_connected();
		sm_chan_flush();
		while (A.graveyard) {
			struct sm_stream *s = A.graveyard;
			A.graveyard = s->gnext;
			free(s);
		}
	}
}
