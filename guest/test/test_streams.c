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
