/* sm-net: the host side of a VM's network allow-list (docs/network.md, "Allow-lists").
 *
 *   sm-net [--allow A.B.C.D[/N]:PORT]... [--status-fd N] [--exe-fd N] [--max-conns N]
 *          [--connect-timeout-ms N] (--check | -- PROGRAM ARGS...)
 *
 * It forks. The child makes a user + network namespace of its own (no root, no setuid helper, no
 * /dev/net/tun), brings up `lo`, makes every allowed CIDR local to `lo` (AnyIP routes), opens one
 * listening TCP socket per allowed port, hands the listeners to the parent (SCM_RIGHTS), drops
 * every capability it holds in the namespace and execs PROGRAM (QEMU with `-netdev user`) there.
 * The namespace has no interface but `lo`, and QEMU no capability over it: the only way out of
 * it is a listener of this relay.
 *
 * The parent stays in the host's namespaces and relays. For each connection QEMU's user-mode
 * network makes inside the namespace it reads the original destination (getsockname), checks it
 * against the allow-list and connects from the host. A loopback destination is the guest's
 * 10.0.2.2, which QEMU turns into the namespace's 127.0.0.1: it means the HOST's loopback, and only
 * rules inside 127.0.0.0/8 match it (so 0.0.0.0/0:443 does not open the host's 127.0.0.1:443).
 *
 * Bounds: --max-conns connections (default 256), two 32 KiB buffers each, a connect timeout
 * (default 10 s). Supervision: it dies (SIGKILL) when its parent dies, PROGRAM dies when it dies;
 * TERM/INT/HUP are passed on to PROGRAM, and it ends the way PROGRAM ended (same exit code, or the
 * same signal). It refuses to run as root: start it as the user QEMU runs as.
 *
 * Status lines on --status-fd (non-blocking: dropped rather than ever blocking the relay):
 *   ready                    the namespace is built and PROGRAM was exec'd (--check: built)
 *   deny A.B.C.D:PORT        a connection to a destination not on the list was reset
 *   fail A.B.C.D:PORT WHY    an allowed connection failed (refused, timeout, too many connections)
 *   suppressed N             N deny/fail lines were left out (at most 20 a second are written)
 *   error WHAT: WHY          setup failed; the exit status is then 125
 * --check builds the namespace (same steps, same rules) and exits 0 without running anything.
 * --exe-fd N: the descriptor sm-net itself was exec'd from (/proc/self/fd/N); closed at once.
 *
 * Build: make -C hosttools (static musl, like the guest's sm-init). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Kernel constants musl's headers do not carry (musl-gcc has no kernel headers). */
#define NETLINK_ROUTE_ 0
#define RTM_NEWROUTE_ 24
#define NLM_F_REQUEST_ 1
#define NLM_F_ACK_ 4
#define NLM_F_EXCL_ 0x200
#define NLM_F_CREATE_ 0x400
#define NLMSG_ERROR_ 2
#define RT_TABLE_LOCAL_ 255
#define RTPROT_BOOT_ 3
#define RT_SCOPE_HOST_ 254
#define RTN_LOCAL_ 2
#define RTA_DST_ 1
#define RTA_OIF_ 4
#define CAP_LAST_ 63
/* noroot, no_setuid_fixup and keep_caps_locked, each with its lock bit. */
#define SECBITS_LOCKED_ 0x2f
#define LINUX_CAPABILITY_VERSION_3_ 0x20080522

#define MAX_RULES 256
#define BUF_BYTES (32 * 1024)
#define STATUS_PER_SECOND 20
#define EXIT_SETUP 125

struct rule {
	uint32_t net, mask; /* host byte order */
	uint16_t port;
};

static struct rule rules[MAX_RULES];
static int nrules;
static int status_fd = -1;
static int max_conns = 256;
static int connect_timeout_ms = 10000;

/* ------------------------------------------------------------------ status lines and errors */

static void status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void status(const char *fmt, ...)
{
	if (status_fd < 0)
		return;
	char line[160];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof line - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	/* Non-blocking: a host that does not read loses lines, the relay never waits for it. */
	ssize_t w = write(status_fd, line, n);
	(void)w;
}

static void __attribute__((noreturn)) fail_setup(const char *what)
{
	const char *why = strerror(errno);
	fprintf(stderr, "sm-net: %s: %s\n", what, why);
	status("error %s: %s", what, why);
	exit(EXIT_SETUP);
}

static void __attribute__((noreturn)) usage(const char *why)
{
	fprintf(stderr, "sm-net: %s\n", why);
	fprintf(stderr, "usage: sm-net [--allow A.B.C.D[/N]:PORT]... [--status-fd N] [--exe-fd N] "
			"[--max-conns N] [--connect-timeout-ms N] (--check | -- PROGRAM ARGS...)\n");
	status("error usage: %s", why);
	exit(EXIT_SETUP);
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* deny/fail lines: at most STATUS_PER_SECOND per second; the rest are counted and summed up. */
static long long window_start;
static int window_lines;
static long long suppressed;

static int rate_ok(void)
{
	long long t = now_ms();
	if (t - window_start >= 1000) {
		if (suppressed > 0)
			status("suppressed %lld", suppressed);
		suppressed = 0;
		window_start = t;
		window_lines = 0;
	}
	if (window_lines >= STATUS_PER_SECOND) {
		suppressed++;
		return 0;
	}
	window_lines++;
	return 1;
}

/* ------------------------------------------------------------------ arguments and rules */

static long parse_number(const char *s, long min, long max, const char *what)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < min || v > max) {
		char msg[128];
		snprintf(msg, sizeof msg, "%s must be a number from %ld to %ld, got %.40s", what, min, max, s);
		usage(msg);
	}
	return v;
}

static void parse_rule(const char *s)
{
	char buf[64], msg[128];
	snprintf(msg, sizeof msg, "bad --allow %.40s (want A.B.C.D[/N]:PORT)", s);
	if (strlen(s) >= sizeof buf)
		usage(msg);
	if (nrules == MAX_RULES)
		usage("too many --allow rules (at most 256)");
	strcpy(buf, s);
	char *colon = strrchr(buf, ':');
	if (!colon)
		usage(msg);
	*colon = 0;
	long port = parse_number(colon + 1, 1, 65535, "an --allow port");
	long plen = 32;
	char *slash = strchr(buf, '/');
	if (slash) {
		*slash = 0;
		plen = parse_number(slash + 1, 0, 32, "an --allow prefix length");
	}
	struct in_addr a;
	if (inet_pton(AF_INET, buf, &a) != 1)
		usage(msg);
	uint32_t mask = plen ? 0xffffffffu << (32 - plen) : 0;
	rules[nrules++] = (struct rule){ ntohl(a.s_addr) & mask, mask, (uint16_t)port };
}

static int is_loopback(uint32_t a)
{
	return (a >> 24) == 127;
}

static int allowed(uint32_t a, uint16_t port)
{
	for (int i = 0; i < nrules; i++) {
		const struct rule *r = &rules[i];
		if (r->port != port || (a & r->mask) != r->net)
			continue;
		/* A loopback destination is the host's loopback: only a loopback rule opens it. */
		if (is_loopback(a) != is_loopback(r->net))
			continue;
		return 1;
	}
	return 0;
}

/* ------------------------------------------------------------------ child: the namespace */

static void write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
		fail_setup(path);
	close(fd);
}

/* `ip route add local NET/PLEN dev lo` (table local): the CIDR's addresses become this namespace's. */
static void add_local_route(uint32_t net, int plen)
{
	struct {
		struct {
			uint32_t len;
			uint16_t type, flags;
			uint32_t seq, pid;
		} nh;
		struct {
			uint8_t family, dst_len, src_len, tos, table, protocol, scope, type;
			uint32_t flags;
		} rt;
		struct {
			uint16_t len, type;
			uint32_t value;
		} dst, oif;
	} req;
	memset(&req, 0, sizeof req);
	req.nh.len = sizeof req;
	req.nh.type = RTM_NEWROUTE_;
	req.nh.flags = NLM_F_REQUEST_ | NLM_F_ACK_ | NLM_F_CREATE_ | NLM_F_EXCL_;
	req.nh.seq = 1;
	req.rt.family = AF_INET;
	req.rt.dst_len = plen;
	req.rt.table = RT_TABLE_LOCAL_;
	req.rt.protocol = RTPROT_BOOT_;
	req.rt.scope = RT_SCOPE_HOST_;
	req.rt.type = RTN_LOCAL_;
	req.dst.len = 8;
	req.dst.type = RTA_DST_;
	req.dst.value = htonl(net);
	req.oif.len = 8;
	req.oif.type = RTA_OIF_;
	req.oif.value = if_nametoindex("lo");
	int s = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE_);
	if (s < 0)
		fail_setup("netlink socket");
	if (send(s, &req, sizeof req, 0) < 0)
		fail_setup("netlink send");
	char answer[512];
	ssize_t n = recv(s, answer, sizeof answer, 0);
	/* nlmsghdr (16 bytes), then the error: 0 is the ACK. */
	if (n < 20)
		fail_setup("netlink answer");
	uint16_t type;
	int32_t err;
	memcpy(&type, answer + 4, 2);
	memcpy(&err, answer + 16, 4);
	if (type != NLMSG_ERROR_) {
		errno = EPROTO;
		fail_setup("add local route");
	}
	if (err && err != -EEXIST) {
		errno = -err;
		fail_setup("add local route");
	}
	close(s);
}

static void drop_capabilities(void)
{
	/* An empty bounding set: no exec can give a capability back, even to this namespace's uid 0. */
	for (int c = 0; c <= CAP_LAST_; c++)
		if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0 && errno != EINVAL)
			fail_setup("drop bounding set");
	if (prctl(PR_SET_SECUREBITS, SECBITS_LOCKED_, 0, 0, 0) < 0)
		fail_setup("set securebits");
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
		fail_setup("clear ambient capabilities");
	struct {
		uint32_t version;
		int pid;
	} header = { LINUX_CAPABILITY_VERSION_3_, 0 };
	struct {
		uint32_t effective, permitted, inheritable;
	} data[2];
	memset(data, 0, sizeof data);
	if (syscall(SYS_capset, &header, data) < 0)
		fail_setup("capset");
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		fail_setup("no_new_privs");
}

/* Builds the namespace, sends the listeners on `sock`, then execs `argv` (or exits 0 with --check).
 * A failure after the listeners were sent is written on `sock` (the parent reads it as the error). */
static void __attribute__((noreturn)) child(int sock, pid_t relay, char **argv)
{
	uid_t uid = getuid();
	gid_t gid = getgid();
	if (unshare(CLONE_NEWUSER | CLONE_NEWNET) < 0)
		fail_setup("unshare(user+net)");
	char map[64];
	write_file("/proc/self/setgroups", "deny");
	snprintf(map, sizeof map, "%u %u 1", (unsigned)uid, (unsigned)uid);
	write_file("/proc/self/uid_map", map);
	snprintf(map, sizeof map, "%u %u 1", (unsigned)gid, (unsigned)gid);
	write_file("/proc/self/gid_map", map);

	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		fail_setup("socket");
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	strcpy(ifr.ifr_name, "lo");
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
		fail_setup("read the flags of lo");
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
		fail_setup("bring lo up");
	close(s);

	for (int i = 0; i < nrules; i++)
		if (!is_loopback(rules[i].net))
			add_local_route(rules[i].net, __builtin_popcount(rules[i].mask));

	/* One listener per distinct port, on every (local) address of the namespace. */
	int fds[MAX_RULES], nfds = 0;
	for (int i = 0; i < nrules; i++) {
		int seen = 0;
		for (int j = 0; j < i; j++)
			seen |= rules[j].port == rules[i].port;
		if (seen)
			continue;
		int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0), one = 1;
		if (l < 0)
			fail_setup("listener socket");
		setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(rules[i].port) };
		if (bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 128) < 0)
			fail_setup("listen");
		fds[nfds++] = l;
	}
	char cbuf[CMSG_SPACE(sizeof(int) * MAX_RULES)];
	memset(cbuf, 0, sizeof cbuf);
	char count = 1;
	struct iovec iov = { &count, 1 };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (nfds) {
		m.msg_control = cbuf;
		m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		struct cmsghdr *c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
	}
	if (sendmsg(sock, &m, 0) < 0)
		fail_setup("hand the listeners over");
	for (int i = 0; i < nfds; i++)
		close(fds[i]);

	drop_capabilities();
	if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
		fail_setup("PR_SET_PDEATHSIG");
	if (getppid() != relay)
		_exit(EXIT_SETUP); /* the relay died before the line above */
	if (!argv)
		_exit(0); /* --check */
	/* PROGRAM starts with the signal state it would have had without the relay. */
	signal(SIGPIPE, SIG_DFL);
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	execvp(argv[0], argv);
	/* `sock` is close-on-exec: the parent reads EOF when the exec worked, this text when not. */
	char msg[256];
	int n = snprintf(msg, sizeof msg, "exec %.200s: %s", argv[0], strerror(errno));
	ssize_t w = send(sock, msg, n, 0);
	(void)w;
	_exit(EXIT_SETUP);
}

/* ------------------------------------------------------------------ parent: the relay */

struct end {
	int fd;
	char *buf; /* bytes read from this end, not yet written to the other */
	size_t off, len;
	int eof;	/* read side saw EOF */
	int shut;	/* this end's write side was shut down */
	int registered; /* in the epoll set */
};

struct conn {
	struct end e[2]; /* 0: the namespace side (QEMU), 1: the destination */
	int connecting;
	long long deadline; /* while connecting */
	uint32_t dst;
	uint16_t port;
	int dead; /* freed at the end of the current event batch */
	struct conn *prev, *next; /* every live connection */
};

static int ep;
static int nconns;
static struct conn *conns;
static struct conn *graveyard;

/* epoll data: a connection pointer tagged with the end (0/1), or a listener/signalfd tagged 2/3. */
#define TAG_LISTENER 2
#define TAG_SIGNAL 3

static void reset_close(int fd)
{
	struct linger l = { 1, 0 };
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
	close(fd);
}

static void addr_text(uint32_t a, char *out, size_t cap)
{
	struct in_addr in = { htonl(a) };
	inet_ntop(AF_INET, &in, out, cap);
}

static void report(const char *kind, uint32_t dst, uint16_t port, const char *why)
{
	if (!rate_ok())
		return;
	char ip[INET_ADDRSTRLEN];
	addr_text(dst, ip, sizeof ip);
	if (why)
		status("%s %s:%u %s", kind, ip, port, why);
	else
		status("%s %s:%u", kind, ip, port);
}

/* Level-triggered. An end with nothing to wait for leaves the epoll set: EPOLLHUP/EPOLLERR cannot
 * be masked and would spin the loop. */
static void conn_interest(struct conn *c)
{
	for (int i = 0; i < 2; i++) {
		struct end *me = &c->e[i], *other = &c->e[1 - i];
		uint32_t ev = 0;
		if (c->connecting) {
			ev = i == 1 ? EPOLLOUT : 0; /* the namespace side waits */
		} else {
			if (!me->eof && me->len == 0)
				ev |= EPOLLIN;
			if (other->len > 0)
				ev |= EPOLLOUT;
		}
		struct epoll_event e = { .events = ev, .data.ptr = (void *)((uintptr_t)c | i) };
		if (ev == 0) {
			if (me->registered)
				epoll_ctl(ep, EPOLL_CTL_DEL, me->fd, NULL), me->registered = 0;
		} else if (me->registered) {
			epoll_ctl(ep, EPOLL_CTL_MOD, me->fd, &e);
		} else {
			epoll_ctl(ep, EPOLL_CTL_ADD, me->fd, &e), me->registered = 1;
		}
	}
}

static void conn_free(struct conn *c, int reset)
{
	for (int i = 0; i < 2; i++) {
		if (c->e[i].registered)
			epoll_ctl(ep, EPOLL_CTL_DEL, c->e[i].fd, NULL);
		if (reset)
			reset_close(c->e[i].fd);
		else
			close(c->e[i].fd);
		free(c->e[i].buf);
		c->e[i].buf = NULL;
	}
	if (c->prev)
		c->prev->next = c->next;
	else
		conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	c->dead = 1;
	c->next = graveyard;
	graveyard = c;
	nconns--;
}

static void on_accept(int l)
{
	for (;;) {
		int a = accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (a < 0)
			return;
		struct sockaddr_in d;
		socklen_t dl = sizeof d;
		if (getsockname(a, (struct sockaddr *)&d, &dl) < 0 || d.sin_family != AF_INET) {
			reset_close(a);
			continue;
		}
		uint32_t dst = ntohl(d.sin_addr.s_addr);
		uint16_t port = ntohs(d.sin_port);
		if (!allowed(dst, port)) {
			report("deny", dst, port, NULL);
			reset_close(a);
			continue;
		}
		if (nconns >= max_conns) {
			report("fail", dst, port, "too-many-connections");
			reset_close(a);
			continue;
		}
		/* The destination, from the host's namespaces: loopback is the host's own. */
		int b = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
		struct conn *c = calloc(1, sizeof *c);
		char *buf0 = malloc(BUF_BYTES), *buf1 = malloc(BUF_BYTES);
		if (b < 0 || !c || !buf0 || !buf1) {
			report("fail", dst, port, "out-of-resources");
			reset_close(a);
			if (b >= 0)
				close(b);
			free(c), free(buf0), free(buf1);
			continue;
		}
		setsockopt(a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		if (connect(b, (struct sockaddr *)&d, sizeof d) < 0 && errno != EINPROGRESS) {
			report("fail", dst, port, strerror(errno));
			reset_close(a);
			close(b);
			free(c), free(buf0), free(buf1);
			continue;
		}
		c->e[0] = (struct end){ .fd = a, .buf = buf0 };
		c->e[1] = (struct end){ .fd = b, .buf = buf1 };
		c->connecting = 1;
		c->deadline = now_ms() + connect_timeout_ms;
		c->dst = dst;
		c->port = port;
		c->next = conns;
		if (conns)
			conns->prev = c;
		conns = c;
		nconns++;
		conn_interest(c);
	}
}

static void on_conn(struct conn *c, int i, uint32_t ev)
{
	if (c->dead)
		return;
	if (c->connecting) {
		if (i == 0) { /* the namespace side left before the destination answered */
			if (ev & (EPOLLHUP | EPOLLERR))
				conn_free(c, 1);
			return;
		}
		int err = 0;
		socklen_t l = sizeof err;
		getsockopt(c->e[1].fd, SOL_SOCKET, SO_ERROR, &err, &l);
		if (err) {
			report("fail", c->dst, c->port, strerror(err));
			conn_free(c, 1);
			return;
		}
		c->connecting = 0;
		conn_interest(c);
		return;
	}
	struct end *me = &c->e[i], *other = &c->e[1 - i];
	if ((ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !me->eof && me->len == 0) {
		ssize_t n = read(me->fd, me->buf, BUF_BYTES);
		if (n > 0) {
			me->len = n;
			me->off = 0;
		} else if (n == 0) {
			me->eof = 1;
		} else if (errno != EAGAIN && errno != EINTR) {
			conn_free(c, 1);
			return;
		}
	}
	if ((ev & (EPOLLOUT | EPOLLERR)) && other->len > 0) {
		ssize_t n = write(me->fd, other->buf + other->off, other->len);
		if (n > 0) {
			other->off += n;
			other->len -= n;
		} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
			conn_free(c, 1);
			return;
		}
	}
	/* Pass a half-close on once everything read before it has been written. */
	for (int k = 0; k < 2; k++) {
		if (c->e[k].eof && c->e[k].len == 0 && !c->e[1 - k].shut) {
			shutdown(c->e[1 - k].fd, SHUT_WR);
			c->e[1 - k].shut = 1;
		}
	}
	if (c->e[0].shut && c->e[1].shut) {
		conn_free(c, 0);
		return;
	}
	conn_interest(c);
}

/* Connections still connecting past their deadline are reset; returns ms until the next deadline. */
static int expire_connects(void)
{
	long long t = now_ms(), next = -1;
	for (struct conn *c = conns, *n; c; c = n) {
		n = c->next;
		if (!c->connecting)
			continue;
		if (c->deadline <= t) {
			report("fail", c->dst, c->port, "connect-timeout");
			conn_free(c, 1);
		} else if (next < 0 || c->deadline < next) {
			next = c->deadline;
		}
	}
	if (suppressed > 0) { /* report the count once its window is over */
		long long flush = window_start + 1000;
		if (flush <= t) {
			status("suppressed %lld", suppressed);
			suppressed = 0;
		} else if (next < 0 || flush < next) {
			next = flush;
		}
	}
	if (next < 0)
		return -1;
	return next <= t ? 0 : (int)(next - t);
}

/* Ends this process the way PROGRAM ended: its exit code, or its signal. */
static void __attribute__((noreturn)) end_like(int st)
{
	if (WIFEXITED(st))
		exit(WEXITSTATUS(st));
	int sig = WTERMSIG(st);
	signal(sig, SIG_DFL);
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, sig);
	sigprocmask(SIG_UNBLOCK, &set, NULL);
	raise(sig);
	exit(128 + sig);
}

int main(int argc, char **argv)
{
	int i = 1, check = 0;
	for (; i < argc && strcmp(argv[i], "--"); i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--status-fd") && i + 1 < argc) {
			status_fd = parse_number(argv[++i], 3, INT_MAX, "--status-fd");
			if (fcntl(status_fd, F_SETFD, FD_CLOEXEC) < 0 ||
			    fcntl(status_fd, F_SETFL, fcntl(status_fd, F_GETFL) | O_NONBLOCK) < 0) {
				status_fd = -1;
				usage("--status-fd is not an open descriptor");
			}
		} else if (!strcmp(a, "--exe-fd") && i + 1 < argc) {
			close(parse_number(argv[++i], 3, INT_MAX, "--exe-fd"));
		} else if (!strcmp(a, "--allow") && i + 1 < argc) {
			parse_rule(argv[++i]);
		} else if (!strcmp(a, "--max-conns") && i + 1 < argc) {
			max_conns = parse_number(argv[++i], 1, 65536, "--max-conns");
		} else if (!strcmp(a, "--connect-timeout-ms") && i + 1 < argc) {
			connect_timeout_ms = parse_number(argv[++i], 1, 3600 * 1000, "--connect-timeout-ms");
		} else if (!strcmp(a, "--check")) {
			check = 1;
		} else {
			char msg[96];
			snprintf(msg, sizeof msg, "unknown argument %.40s", a);
			usage(msg);
		}
	}
	char **program = i + 1 < argc ? argv + i + 1 : NULL;
	if (check == (program != NULL))
		usage(check ? "--check runs no program" : "no program to run after --");
	if (geteuid() == 0 || getuid() == 0) {
		errno = EPERM;
		fail_setup("refusing to run as root (start sm-net as the unprivileged user QEMU runs as)");
	}

	pid_t parent = getppid();
	if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
		fail_setup("PR_SET_PDEATHSIG");
	if (getppid() != parent)
		return EXIT_SETUP;
	signal(SIGPIPE, SIG_IGN);
	sigset_t sigs;
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGCHLD);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	sigprocmask(SIG_BLOCK, &sigs, NULL);

	int sp[2];
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) < 0)
		fail_setup("socketpair");
	pid_t relay = getpid();
	pid_t pid = fork();
	if (pid < 0)
		fail_setup("fork");
	if (pid == 0) {
		close(sp[0]);
		child(sp[1], relay, program);
	}
	close(sp[1]);

	int lfds[MAX_RULES], nl = 0;
	char cbuf[CMSG_SPACE(sizeof(int) * MAX_RULES)];
	char byte;
	struct iovec iov = { &byte, 1 };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf };
	ssize_t got;
	do
		got = recvmsg(sp[0], &m, MSG_CMSG_CLOEXEC);
	while (got < 0 && errno == EINTR);
	if (got != 1) { /* the child failed (it said why) before handing the listeners over */
		int st;
		while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
			;
		return EXIT_SETUP;
	}
	struct cmsghdr *c = CMSG_FIRSTHDR(&m);
	if (c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
		nl = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		memcpy(lfds, CMSG_DATA(c), sizeof(int) * nl);
	}
	/* EOF: the exec worked (the socket is close-on-exec) or --check is done; text: it failed. */
	char msg[256];
	do
		got = recv(sp[0], msg, sizeof msg - 1, 0);
	while (got < 0 && errno == EINTR);
	close(sp[0]);
	if (got > 0) {
		msg[got] = 0;
		fprintf(stderr, "sm-net: %s\n", msg);
		status("error %s", msg);
		int st;
		while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
			;
		return EXIT_SETUP;
	}
	if (check) {
		int st;
		while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
			;
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
			return EXIT_SETUP;
		status("ready");
		return 0;
	}
	status("ready");

	ep = epoll_create1(EPOLL_CLOEXEC);
	int sfd = signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK);
	if (ep < 0 || sfd < 0) {
		kill(pid, SIGKILL);
		fail_setup("epoll");
	}
	struct epoll_event e = { .events = EPOLLIN, .data.ptr = (void *)(uintptr_t)TAG_SIGNAL };
	epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &e);
	for (int k = 0; k < nl; k++) {
		/* Connection pointers are 8-aligned and tagged 0/1; a listener is its fd shifted, tagged 2. */
		e = (struct epoll_event){ .events = EPOLLIN,
					  .data.ptr = (void *)(((uintptr_t)lfds[k] << 2) | TAG_LISTENER) };
		epoll_ctl(ep, EPOLL_CTL_ADD, lfds[k], &e);
	}
	for (;;) {
		struct epoll_event evs[64];
		int n = epoll_wait(ep, evs, 64, expire_connects());
		for (int k = 0; k < n; k++) {
			uintptr_t p = (uintptr_t)evs[k].data.ptr;
			if (p == TAG_SIGNAL) {
				struct signalfd_siginfo si;
				while (read(sfd, &si, sizeof si) == sizeof si) {
					if (si.ssi_signo != SIGCHLD) {
						kill(pid, si.ssi_signo);
						continue;
					}
					int st;
					pid_t w;
					while ((w = waitpid(-1, &st, WNOHANG)) > 0)
						if (w == pid)
							end_like(st);
				}
			} else if ((p & 3) == TAG_LISTENER) {
				on_accept((int)(p >> 2));
			} else {
				on_conn((struct conn *)(p & ~(uintptr_t)3), (int)(p & 1), evs[k].events);
			}
		}
		while (graveyard) { /* connections freed during the batch, after their last event in it */
			struct conn *dead = graveyard;
			graveyard = dead->next;
			free(dead);
		}
	}
}
