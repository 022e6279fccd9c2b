/* TCP tunnels (docs/protocol.md, "TCP tunnels"): a stream the agent connects to address:port in the
 * guest. Non-blocking throughout: the connect is finished by poll, host data is buffered within
 * the credit granted back as it is written into the socket, and socket data is read only within
 * the host's credit. */
#define _GNU_SOURCE
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

enum { T_CONNECTING = 1, T_OPEN };

struct tcp {
	int fd;
	int state;
	uint64_t credit;     /* guest->host bytes the host has granted */
	uint8_t *inq;        /* host->guest bytes not yet written into the socket */
	size_t inq_off, inq_len, inq_cap;
	uint64_t in_unacked; /* host->guest bytes received and not yet granted back */
	int in_fin;          /* the host's FIN arrived */
	int wr_shut;         /* ... and everything before it is written: shutdown(SHUT_WR) done */
	int rd_eof;          /* the socket reached EOF: FIN sent to the host */
	char peer[64];       /* address:port, for messages */
};

static struct sm_field tf[16];

static void tcp_fail(struct sm_stream *s, int e, const char *what)
{
	struct tcp *t = s->priv;
	sm_send_error(s->id, SM_E_IO, e, "%s %s: %s", what, t->peer, strerror(e));
	sm_stream_close(s, 1);
}

static void check_done(struct sm_stream *s)
{
	struct tcp *t = s->priv;
	if (t->rd_eof && t->wr_shut) {
		sm_send_buf(sm_scratch(), s->id, SM_OK, 0);
		sm_stream_close(s, 0);
	}
}

/* Write buffered host data into the socket; grant it back as it goes. Returns -1 if the stream
 * ended. */
static int write_pump(struct sm_stream *s)
{
	struct tcp *t = s->priv;
	if (t->state != T_OPEN)
		return 0;
	while (t->inq_len > 0) {
		ssize_t w = send(t->fd, t->inq + t->inq_off, t->inq_len, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN)
			break;
		if (w < 0) {
			tcp_fail(s, errno, "writing to");
			return -1;
		}
		t->inq_off += (size_t)w;
		t->inq_len -= (size_t)w;
		t->in_unacked -= (uint64_t)w;
		sm_send_window(s->id, (uint32_t)w);
	}
	if (t->inq_len == 0)
		t->inq_off = 0;
	if (t->inq_len == 0 && t->in_fin && !t->wr_shut) {
		shutdown(t->fd, SHUT_WR);
		t->wr_shut = 1;
		check_done(s);
		if (s->dead)
			return -1;
	}
	return 0;
}

static void read_pump(struct sm_stream *s)
{
	struct tcp *t = s->priv;
	if (t->state != T_OPEN || t->rd_eof || t->credit <= SM_FRAME_COST || sm_output_blocked())
		return;
	uint64_t room = t->credit - SM_FRAME_COST;
	if (room > SM_CHUNK)
		room = SM_CHUNK;
	uint8_t *buf = sm_frame_alloc((size_t)room);
	if (!buf)
		return;
	ssize_t r = recv(t->fd, buf, (size_t)room, MSG_DONTWAIT);
	if (r > 0) {
		sm_frame_commit(buf, s->id, SM_TCP_DATA, 0, (size_t)r);
		t->credit -= (uint64_t)r + SM_FRAME_COST;
		return;
	}
	sm_frame_cancel(buf);
	if (r < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (r < 0) {
		tcp_fail(s, errno, "reading from");
		return;
	}
	t->rd_eof = 1;
	sm_send(s->id, SM_TCP_DATA, SM_FLAG_FIN, NULL, 0);
	check_done(s);
}

static void connected(struct sm_stream *s)
{
	struct tcp *t = s->priv;
	t->state = T_OPEN;
	sm_send_buf(sm_scratch(), s->id, SM_TCP_CONNECTED, 0);
	write_pump(s);
}

void sm_tcp_open(uint32_t id, const uint8_t *p, size_t n)
{
	static const struct sm_spec spec[] = { { 1, SM_K_U16, SM_REQ }, { 2, SM_K_STRING, 0 }, { 3, SM_K_U32, 0 } };
	char err[256], addr[64] = "127.0.0.1";
	int nf = sm_fields_split(p, n, tf, 16);
	if (nf < 0 || sm_fields_check(tf, nf, spec, 3, err, sizeof err)) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "TCP_CONNECT: %s", nf < 0 ? "malformed fields" : err);
		return;
	}
	uint16_t port = (uint16_t)sm_get_u(tf, nf, 1, 0);
	const struct sm_field *af = sm_find(tf, nf, 2);
	if (af) {
		if (af->len == 0 || af->len >= sizeof addr) {
			sm_send_error(id, SM_E_BAD_REQUEST, 0, "TCP_CONNECT: address of %u bytes", af->len);
			return;
		}
		memcpy(addr, af->val, af->len);
		addr[af->len] = 0;
	}
	union {
		struct sockaddr sa;
		struct sockaddr_in in4;
		struct sockaddr_in6 in6;
	} sa;
	memset(&sa, 0, sizeof sa);
	socklen_t salen;
	if (inet_pton(AF_INET, addr, &sa.in4.sin_addr) == 1) {
		sa.in4.sin_family = AF_INET;
		sa.in4.sin_port = htons(port);
		salen = sizeof sa.in4;
	} else if (inet_pton(AF_INET6, addr, &sa.in6.sin6_addr) == 1) {
		sa.in6.sin6_family = AF_INET6;
		sa.in6.sin6_port = htons(port);
		salen = sizeof sa.in6;
	} else {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "TCP_CONNECT: %s is not an IPv4 or IPv6 address", addr);
		return;
	}
	if (port == 0) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "TCP_CONNECT: port 0");
		return;
	}
	struct tcp *t = calloc(1, sizeof *t);
	struct sm_stream *s = t ? sm_stream_new(id, SK_TCP) : NULL;
	if (!s) {
		free(t);
		sm_send_error(id, SM_E_IO, ENOMEM, "out of memory");
		return;
	}
	s->priv = t;
	t->credit = sm_get_u(tf, nf, 3, SM_DEFAULT_WINDOW);
	snprintf(t->peer, sizeof t->peer, sa.sa.sa_family == AF_INET6 ? "[%s]:%u" : "%s:%u", addr, (unsigned)port);
	t->fd = socket(sa.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (t->fd < 0) {
		tcp_fail(s, errno, "connecting to");
		return;
	}
	if (connect(t->fd, &sa.sa, salen) == 0) {
		connected(s);
		return;
	}
	if (errno != EINPROGRESS && errno != EINTR) {
		tcp_fail(s, errno, "connecting to");
		return;
	}
	t->state = T_CONNECTING;
}

void sm_tcp_poll(struct sm_stream *s, int fd[4], short ev[4])
{
	struct tcp *t = s->priv;
	fd[0] = t->fd;
	if (t->state == T_CONNECTING) {
		ev[0] = POLLOUT;
		return;
	}
	if (!t->rd_eof && t->credit > SM_FRAME_COST && !sm_output_blocked())
		ev[0] |= POLLIN;
	if (t->inq_len > 0)
		ev[0] |= POLLOUT;
}

void sm_tcp_event(struct sm_stream *s, int role, short revents)
{
	struct tcp *t = s->priv;
	(void)role;
	if (t->state == T_CONNECTING) {
		int e = 0;
		socklen_t el = sizeof e;
		if (getsockopt(t->fd, SOL_SOCKET, SO_ERROR, &e, &el) < 0)
			e = errno;
		if (e == EINPROGRESS || e == EALREADY)
			return;
		if (e) {
			tcp_fail(s, e, "connecting to");
			return;
		}
		connected(s);
		return;
	}
	if ((revents & (POLLOUT | POLLERR | POLLHUP)) && t->inq_len > 0 && write_pump(s) < 0)
		return;
	if (revents & (POLLIN | POLLERR | POLLHUP))
		read_pump(s);
}

static void on_data(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p)
{
	struct tcp *t = s->priv;
	if (t->in_fin) {
		sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "TCP_DATA after its FIN");
		sm_stream_close(s, 1);
		return;
	}
	if (t->in_unacked + h->length > SM_STDIN_WINDOW) {
		sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "TCP_DATA beyond the window granted (%llu bytes unacknowledged)",
			      (unsigned long long)t->in_unacked);
		sm_stream_close(s, 1);
		return;
	}
	t->in_unacked += h->length;
	if (h->flags & SM_FLAG_FIN)
		t->in_fin = 1;
	if (h->length) {
		if (t->inq_off + t->inq_len + h->length > t->inq_cap) {
			if (t->inq_off) {
				memmove(t->inq, t->inq + t->inq_off, t->inq_len);
				t->inq_off = 0;
			}
			if (t->inq_len + h->length > t->inq_cap) {
				size_t cap = t->inq_cap ? t->inq_cap : 4096;
				while (cap < t->inq_len + h->length)
					cap *= 2;
				uint8_t *q = realloc(t->inq, cap);
				if (!q) {
					tcp_fail(s, ENOMEM, "buffering data for");
					return;
				}
				t->inq = q;
				t->inq_cap = cap;
			}
		}
		memcpy(t->inq + t->inq_off + t->inq_len, p, h->length);
		t->inq_len += h->length;
	}
	write_pump(s);
}

void sm_tcp_frame(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p)
{
	switch (h->type) {
	case SM_TCP_DATA:
		on_data(s, h, p);
		return;
	case SM_WINDOW:
		((struct tcp *)s->priv)->credit += sm_be32(p);
		return;
	default:
		sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "%s on a TCP stream", sm_type_name(h->type));
		sm_stream_close(s, 1);
		return;
	}
}

void sm_tcp_release(struct sm_stream *s, int abandon)
{
	struct tcp *t = s->priv;
	if (!t)
		return;
	if (t->fd >= 0) {
		if (abandon) { /* RESET or failure: an abortive close (RST), not an orderly FIN */
			struct linger lg = { 1, 0 };
			setsockopt(t->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
		}
		close(t->fd);
	}
	free(t->inq);
	free(t);
	s->priv = NULL;
}
