/* The test harness: run `sm-init --channel-fd 3` in host mode over a socketpair and speak the
 * protocol to it. Every frame the agent sends is checked against the message schemas. */
#define _GNU_SOURCE
#include "harness.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

const char *agent_bin;
int failures, checks;
const char *current = "";
char tmpdir[256];

void fail(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "FAIL [%s] ", current);
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	failures++;
}

int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------------------------------------------
 * Talking to an agent.
 */

void start(struct agent *a)
{
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
		perror("socketpair");
		exit(2);
	}
	a->pid = fork();
	if (a->pid == 0) {
		dup2(sv[1], 3);
		execl(agent_bin, agent_bin, "--channel-fd", "3", (char *)NULL);
		_exit(127);
	}
	close(sv[1]);
	a->fd = sv[0];
	a->buf = malloc(SM_HDR_SIZE + SM_MAX_PAYLOAD);
	a->len = 0;
	a->consumed = 0;
	a->next_id = 1;
}

/* Close the channel and return the agent's exit status. */
int stop(struct agent *a)
{
	close(a->fd);
	int st = -1;
	int64_t end = now_ms() + 10000;
	while (waitpid(a->pid, &st, WNOHANG) == 0) {
		if (now_ms() > end) {
			fail("the agent did not exit after its channel closed");
			kill(a->pid, SIGKILL);
			waitpid(a->pid, &st, 0);
			break;
		}
		usleep(2000);
	}
	free(a->buf);
	return st;
}

void send_raw(struct agent *a, const void *p, size_t n)
{
	const uint8_t *b = p;
	while (n) {
		ssize_t w = write(a->fd, b, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			fail("write to agent: %s", strerror(errno));
			return;
		}
		b += w;
		n -= (size_t)w;
	}
}

void send_frame(struct agent *a, uint32_t stream, uint8_t type, uint8_t flags, const void *p, size_t n)
{
	uint8_t h[SM_HDR_SIZE];
	struct sm_hdr hd = { (uint32_t)n, stream, type, flags };
	sm_hdr_encode(h, &hd);
	send_raw(a, h, sizeof h);
	if (n)
		send_raw(a, p, n);
}

void send_buf(struct agent *a, struct sm_buf *b, uint32_t stream, uint8_t type)
{
	size_t len = sm_frame_end(b, stream, type, 0);
	send_raw(a, b->data, len);
}

void send_window(struct agent *a, uint32_t stream, uint32_t n)
{
	uint8_t v[4];
	sm_put32(v, n);
	send_frame(a, stream, SM_WINDOW, 0, v, 4);
}

/* Receive one frame: 0, or -1 on timeout, -2 on EOF. The payload stays valid until the next call. */
int recv_frame(struct agent *a, struct frame *f, int timeout_ms)
{
	if (a->consumed) {
		memmove(a->buf, a->buf + a->consumed, a->len - a->consumed);
		a->len -= a->consumed;
		a->consumed = 0;
	}
	int64_t end = now_ms() + timeout_ms;
	for (;;) {
		if (a->len >= SM_HDR_SIZE) {
			if (sm_hdr_decode(a->buf, &f->h)) {
				fail("agent sent a bad header");
				return -2;
			}
			if (a->len >= SM_HDR_SIZE + f->h.length) {
				f->p = a->buf + SM_HDR_SIZE;
				a->consumed = SM_HDR_SIZE + f->h.length;
				char err[200];
				CHECK(sm_type_from_guest(f->h.type), "agent sent type 0x%02x, which is not a guest type",
				      f->h.type);
				CHECK(sm_msg_check(f->h.type, 0, f->p, f->h.length, err, sizeof err) == 0,
				      "agent sent an invalid %s: %s", sm_type_name(f->h.type), err);
				f->nf = sm_fields_split(f->p, f->h.length, f->f, 64);
				return 0;
			}
		}
		int left = (int)(end - now_ms());
		if (left < 0)
			left = 0;
		struct pollfd p = { .fd = a->fd, .events = POLLIN };
		int r = poll(&p, 1, left);
		if (r == 0)
			return -1;
		ssize_t n = read(a->fd, a->buf + a->len, SM_HDR_SIZE + SM_MAX_PAYLOAD - a->len);
		if (n <= 0)
			return -2;
		a->len += (size_t)n;
	}
}

uint64_t fu(const struct frame *f, uint8_t tag, uint64_t dflt) { return sm_get_u(f->f, f->nf, tag, dflt); }

int fstr(const struct frame *f, uint8_t tag, char *out, size_t cap)
{
	const struct sm_field *x = sm_find(f->f, f->nf, tag);
	if (!x) {
		out[0] = 0;
		return -1;
	}
	size_t n = x->len < cap - 1 ? x->len : cap - 1;
	memcpy(out, x->val, n);
	out[n] = 0;
	return 0;
}

/* Expect the next frame to be of `type` on `stream`. */
int expect(struct agent *a, struct frame *f, uint32_t stream, uint8_t type, int timeout_ms)
{
	int r = recv_frame(a, f, timeout_ms);
	if (r) {
		fail("expected %s on stream %u: %s", sm_type_name(type), stream, r == -1 ? "timeout" : "channel closed");
		return -1;
	}
	if (f->h.stream != stream || f->h.type != type) {
		char msg[300] = "";
		if (f->h.type == SM_ERROR)
			fstr(f, 3, msg, sizeof msg);
		fail("expected %s on stream %u, got %s on stream %u %s", sm_type_name(type), stream,
		     sm_type_name(f->h.type), f->h.stream, msg);
		return -1;
	}
	return 0;
}

void hello(struct agent *a, uint64_t epoch)
{
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	sm_put_u32(&b, 1, SM_PROTO_VERSION);
	sm_put_u64(&b, 2, epoch);
	sm_put_u64(&b, 3, 1700000000000000000ull);
	uint8_t ent[32];
	memset(ent, 0x5a, sizeof ent);
	sm_put_bytes(&b, 4, ent, sizeof ent);
	send_buf(a, &b, 0, SM_HELLO);
	sm_buf_free(&b);
	struct frame f;
	if (expect(a, &f, 0, SM_HELLO, 3000) == 0) {
		char agent[64];
		CHECK(fu(&f, 1, 0) == SM_PROTO_VERSION, "HELLO version %u", SM_PROTO_VERSION);
		CHECK(fu(&f, 2, 0) == epoch, "HELLO echoes epoch %llu", (unsigned long long)epoch);
		CHECK(fstr(&f, 5, agent, sizeof agent) == 0 && !strncmp(agent, "sm-init ", 8), "agent name '%s'", agent);
		CHECK(fu(&f, 6, 0) > 0, "bootNs present");
	}
	a->next_id = 1;
}

/* Is the process gone (or a zombie)? Waits up to ms. */
int process_gone(pid_t pid, int ms)
{
	int64_t end = now_ms() + ms;
	for (;;) {
		while (waitpid(-1, NULL, WNOHANG) > 0) /* we are the subreaper of orphans */
			;
		char path[64], buf[256];
		snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
		int fd = open(path, O_RDONLY);
		if (fd < 0)
			return 1;
		ssize_t n = read(fd, buf, sizeof buf - 1);
		close(fd);
		buf[n > 0 ? n : 0] = 0;
		char *rp = strrchr(buf, ')');
		if (rp && rp[1] == ' ' && (rp[2] == 'Z' || rp[2] == 'X'))
			return 1;
		if (now_ms() > end)
			return 0;
		usleep(5000);
	}
}
