/* Agent tests: run `sm-init --channel-fd 3` in host mode over a socketpair and speak the protocol
 * to it (harness.c). Exec, files and sessions here; the streams of protocol version 2 in
 * test_streams.c.
 * Usage: test-agent PATH-TO-SM-INIT */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

/* ------------------------------------------------------------------------------------------------
 * Exec helpers.
 */

struct xreq {
	const char *argv[16];
	const char *env[16];
	const char *chain[4][8];
	const char *cwd;
	const char *user;
	int tty, stdin_on;
	uint32_t timeout_ms, grace_ms, window;
	struct {
		const char *path;
		uint32_t mode;
		const char *content;
	} stage[4];
};

static const char *default_env[] = { "PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/root", NULL };

static uint32_t send_exec(struct agent *a, const struct xreq *x)
{
	uint32_t id = a->next_id++;
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	for (int i = 0; x->argv[i]; i++)
		sm_put_str(&b, 1, x->argv[i]);
	const char *const *env = x->env[0] ? x->env : default_env;
	for (int i = 0; env[i]; i++)
		sm_put_str(&b, 2, env[i]);
	if (x->cwd)
		sm_put_str(&b, 3, x->cwd);
	if (x->user)
		sm_put_str(&b, 4, x->user);
	if (x->tty)
		sm_put_u8(&b, 5, 1);
	if (x->timeout_ms)
		sm_put_u32(&b, 8, x->timeout_ms);
	if (x->grace_ms)
		sm_put_u32(&b, 9, x->grace_ms);
	for (int c = 0; c < 4 && x->chain[c][0]; c++) {
		size_t m = sm_nested_begin(&b, 10);
		for (int i = 0; x->chain[c][i]; i++)
			sm_put_str(&b, 1, x->chain[c][i]);
		sm_nested_end(&b, m);
	}
	if (x->stdin_on)
		sm_put_u8(&b, 11, 1);
	if (x->window)
		sm_put_u32(&b, 12, x->window);
	for (int s = 0; s < 4 && x->stage[s].path; s++) {
		size_t m = sm_nested_begin(&b, 13);
		sm_put_str(&b, 1, x->stage[s].path);
		if (x->stage[s].mode)
			sm_put_u32(&b, 2, x->stage[s].mode);
		sm_put_u64(&b, 3, strlen(x->stage[s].content));
		sm_nested_end(&b, m);
	}
	send_buf(a, &b, id, SM_EXEC);
	sm_buf_free(&b);
	/* staged contents: split each file in two frames to exercise reassembly */
	for (int s = 0; s < 4 && x->stage[s].path; s++) {
		const char *c = x->stage[s].content;
		size_t n = strlen(c), half = n / 2;
		if (half)
			send_frame(a, id, SM_STAGE_DATA, 0, c, half);
		send_frame(a, id, SM_STAGE_DATA, SM_FLAG_FIN, c + half, n - half);
	}
	return id;
}

struct result {
	int error;       /* ERROR code, 0 if none */
	uint32_t errnum;
	char msg[512];
	int started;
	uint32_t pid;
	char out[65536], err[65536];
	size_t nout, nerr;
	int out_fin, err_fin, exited;
	int has_code, has_signal;
	int32_t code;
	uint32_t signal, step;
	int timed_out;
	uint64_t duration_us, peak_rss;
	uint64_t stdin_granted;
	uint64_t total_out, total_err;
};

/* Read frames of stream `id` until EXIT or ERROR, checking their order. */
static void collect_from(struct agent *a, uint32_t id, struct result *r, int timeout_ms, int started)
{
	memset(r, 0, sizeof *r);
	r->started = started;
	int64_t end = now_ms() + timeout_ms;
	for (;;) {
		struct frame f;
		int left = (int)(end - now_ms());
		int rc = recv_frame(a, &f, left > 0 ? left : 0);
		if (rc) {
			fail("stream %u: %s before EXIT", id, rc == -1 ? "timeout" : "channel closed");
			return;
		}
		if (f.h.stream != id) {
			fail("stream %u: unexpected %s on stream %u", id, sm_type_name(f.h.type), f.h.stream);
			continue;
		}
		switch (f.h.type) {
		case SM_ERROR:
			r->error = (int)fu(&f, 1, 0);
			r->errnum = (uint32_t)fu(&f, 2, 0);
			fstr(&f, 3, r->msg, sizeof r->msg);
			CHECK(!r->started, "stream %u: ERROR after STARTED", id);
			return;
		case SM_STARTED:
			CHECK(!r->started, "stream %u: STARTED twice", id);
			r->started = 1;
			r->pid = (uint32_t)fu(&f, 1, 0);
			break;
		case SM_STDOUT:
		case SM_STDERR: {
			int out = f.h.type == SM_STDOUT;
			CHECK(r->started, "stream %u: output before STARTED", id);
			CHECK(!(out ? r->out_fin : r->err_fin), "stream %u: data after FIN", id);
			char *dst = out ? r->out : r->err;
			size_t *n = out ? &r->nout : &r->nerr;
			*(out ? &r->total_out : &r->total_err) += f.h.length;
			size_t room = sizeof r->out - 1 - *n;
			size_t k = f.h.length < room ? f.h.length : room;
			memcpy(dst + *n, f.p, k);
			*n += k;
			dst[*n] = 0;
			if (f.h.flags & SM_FLAG_FIN)
				*(out ? &r->out_fin : &r->err_fin) = 1;
			break;
		}
		case SM_WINDOW:
			r->stdin_granted += sm_be32(f.p);
			break;
		case SM_EXIT:
			CHECK(r->started, "stream %u: EXIT before STARTED", id);
			CHECK(r->out_fin, "stream %u: EXIT before STDOUT FIN", id);
			r->exited = 1;
			r->has_code = sm_find(f.f, f.nf, 1) != NULL;
			r->has_signal = sm_find(f.f, f.nf, 2) != NULL;
			r->code = r->has_code ? sm_ival(sm_find(f.f, f.nf, 1)) : -1000;
			r->signal = (uint32_t)fu(&f, 2, 0);
			r->timed_out = (int)fu(&f, 3, 0);
			r->duration_us = fu(&f, 4, 0);
			r->peak_rss = fu(&f, 5, 0);
			r->step = (uint32_t)fu(&f, 6, 0);
			return;
		default:
			fail("stream %u: unexpected %s", id, sm_type_name(f.h.type));
		}
	}
}

static void collect(struct agent *a, uint32_t id, struct result *r, int timeout_ms)
{
	collect_from(a, id, r, timeout_ms, 0);
}

static struct result R;

static struct result *run(struct agent *a, const struct xreq *x, int timeout_ms)
{
	uint32_t id = send_exec(a, x);
	collect(a, id, &R, timeout_ms);
	return &R;
}


/* ------------------------------------------------------------------------------------------------
 * Tests.
 */

static void test_hello_ping(void)
{
	current = "hello/ping";
	struct agent a;
	start(&a);
	struct frame f;
	/* before HELLO: refused */
	send_frame(&a, 0, SM_PING, 0, "x", 1);
	if (expect(&a, &f, 0, SM_ERROR, 2000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_BAD_REQUEST, "PING before HELLO is BAD_REQUEST");
	/* wrong version */
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	sm_put_u32(&b, 1, SM_PROTO_VERSION + 1);
	sm_put_u64(&b, 2, 1);
	send_buf(&a, &b, 0, SM_HELLO);
	if (expect(&a, &f, 0, SM_ERROR, 2000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_VERSION, "HELLO of another version answered with VERSION");
	/* bad entropy size */
	sm_frame_begin(&b);
	sm_put_u32(&b, 1, SM_PROTO_VERSION);
	sm_put_u64(&b, 2, 1);
	sm_put_bytes(&b, 4, "tiny", 4);
	send_buf(&a, &b, 0, SM_HELLO);
	if (expect(&a, &f, 0, SM_ERROR, 2000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_BAD_REQUEST, "4 bytes of entropy refused");
	sm_buf_free(&b);
	hello(&a, 42);
	send_frame(&a, 0, SM_PING, 0, "0123456789", 10);
	if (expect(&a, &f, 0, SM_PONG, 2000) == 0)
		CHECK(f.h.length == 10 && !memcmp(f.p, "0123456789", 10), "PONG echoes the payload");
	send_frame(&a, 0, SM_PING, 0, NULL, 0);
	if (expect(&a, &f, 0, SM_PONG, 2000) == 0)
		CHECK(f.h.length == 0, "empty PONG");
	char big[65];
	memset(big, 'p', sizeof big);
	send_frame(&a, 0, SM_PING, 0, big, sizeof big);
	if (expect(&a, &f, 0, SM_ERROR, 2000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_BAD_REQUEST, "65-byte PING refused");
	/* unknown types: on stream 0, and on a new stream (which that ends) */
	send_frame(&a, 0, 0x7f, 0, "zz", 2);
	if (expect(&a, &f, 0, SM_ERROR, 2000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_UNSUPPORTED, "unknown type on stream 0: UNSUPPORTED");
	send_frame(&a, 7, 0x7e, 0, NULL, 0);
	if (expect(&a, &f, 7, SM_ERROR, 2000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_UNSUPPORTED, "unknown type on a new stream: UNSUPPORTED on it");
	/* a guest-only type from the host */
	send_frame(&a, 0, SM_PONG, 0, NULL, 0);
	if (expect(&a, &f, 0, SM_ERROR, 2000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_BAD_REQUEST, "PONG from the host refused");
	/* frames for a stream never opened */
	send_frame(&a, 500, SM_STDIN, 0, "x", 1);
	if (expect(&a, &f, 0, SM_ERROR, 2000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_BAD_REQUEST, "STDIN for a stream never opened");
	/* EXEC without argv */
	sm_frame_begin(&b);
	sm_put_str(&b, 2, "A=1");
	send_buf(&a, &b, 8, SM_EXEC);
	if (expect(&a, &f, 8, SM_ERROR, 2000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_BAD_REQUEST, "EXEC without argv: BAD_REQUEST on its stream");
	/* a reused id */
	sm_frame_begin(&b);
	sm_put_str(&b, 1, "true");
	send_buf(&a, &b, 8, SM_EXEC);
	if (expect(&a, &f, 0, SM_ERROR, 2000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_BAD_REQUEST, "reused stream id: BAD_REQUEST on stream 0");
	sm_buf_free(&b);
	/* still alive */
	send_frame(&a, 0, SM_PING, 0, "ok", 2);
	expect(&a, &f, 0, SM_PONG, 2000);
	int st = stop(&a);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "agent exits 0 when the channel closes (status 0x%x)", st);
}

static void test_exec_basic(struct agent *a)
{
	current = "exec basic";
	struct xreq x = { .argv = { "/bin/sh", "-c", "echo hi; echo oops >&2; exit 3" } };
	struct result *r = run(a, &x, 15000);
	CHECK(r->started && r->pid > 0, "STARTED with a pid");
	CHECK(!strcmp(r->out, "hi\n"), "stdout '%s'", r->out);
	CHECK(!strcmp(r->err, "oops\n"), "stderr '%s'", r->err);
	CHECK(r->out_fin && r->err_fin, "both streams FIN");
	CHECK(r->exited && r->has_code && r->code == 3 && !r->has_signal, "exit code 3 (got %d)", r->code);
	CHECK(r->step == 0 && !r->timed_out, "step 0, not timed out");
	CHECK(r->duration_us > 0 && r->duration_us < 5000000, "duration %llu us", (unsigned long long)r->duration_us);
	CHECK(r->peak_rss > 0, "peakRssKiB %llu", (unsigned long long)r->peak_rss);

	current = "exec env";
	struct xreq e = { .argv = { "env" }, .env = { "PATH=/usr/bin:/bin", "A=1", "B=two words", "HOME=/x" } };
	r = run(a, &e, 15000);
	CHECK(!strcmp(r->out, "PATH=/usr/bin:/bin\nA=1\nB=two words\nHOME=/x\n"), "env exactly as given: '%s'", r->out);

	current = "exec cwd/user/HOME";
	struct xreq u = { .argv = { "sh", "-c", "pwd; id -u; echo $HOME" },
			  .env = { "PATH=/usr/bin:/bin" },
			  .cwd = "/tmp",
			  .user = "nobody" };
	r = run(a, &u, 15000);
	if (geteuid() == 0)
		CHECK(!strcmp(r->out, "/tmp\n65534\n/nonexistent\n"), "cwd, uid, HOME from passwd: '%s'", r->out);

	current = "exec missing binary";
	struct xreq m = { .argv = { "/nonexistent/prog" } };
	r = run(a, &m, 15000);
	CHECK(r->error == SM_E_NOT_FOUND && r->errnum == ENOENT, "ERROR NOT_FOUND/ENOENT (got %d/%u: %s)", r->error,
	      r->errnum, r->msg);
	struct xreq m2 = { .argv = { "no-such-command-sm" } };
	r = run(a, &m2, 15000);
	CHECK(r->error == SM_E_NOT_FOUND, "PATH lookup miss: NOT_FOUND (got %d: %s)", r->error, r->msg);
	struct xreq m3 = { .argv = { "true" }, .cwd = "/nonexistent-dir" };
	r = run(a, &m3, 15000);
	CHECK(r->error == SM_E_START_FAILED && r->errnum == ENOENT, "bad cwd: START_FAILED/ENOENT (got %d/%u)",
	      r->error, r->errnum);
	struct xreq m4 = { .argv = { "true" }, .user = "no-such-user-sm" };
	r = run(a, &m4, 15000);
	CHECK(r->error == SM_E_START_FAILED, "unknown user: START_FAILED (got %d: %s)", r->error, r->msg);
	struct xreq m5 = { .argv = { "/etc/passwd" } };
	r = run(a, &m5, 15000);
	CHECK(r->error == SM_E_START_FAILED && r->errnum == EACCES, "not executable: START_FAILED/EACCES (got %d/%u)",
	      r->error, r->errnum);
}

static void test_stdin(struct agent *a)
{
	current = "stdin round trip";
	struct xreq x = { .argv = { "cat" }, .stdin_on = 1 };
	uint32_t id = send_exec(a, &x);
	send_frame(a, id, SM_STDIN, 0, "hello ", 6);
	send_frame(a, id, SM_STDIN, SM_FLAG_FIN, "world", 5);
	collect(a, id, &R, 15000);
	CHECK(!strcmp(R.out, "hello world"), "cat echoes stdin: '%s'", R.out);
	CHECK(R.code == 0, "exit 0");
	CHECK(R.stdin_granted == 11, "11 bytes of stdin granted back (got %llu)", (unsigned long long)R.stdin_granted);

	current = "stdin /dev/null";
	struct xreq n = { .argv = { "cat" } };
	struct result *r = run(a, &n, 15000);
	CHECK(r->exited && r->code == 0 && r->nout == 0, "cat of /dev/null exits 0 with no output");

	/* 1 MiB through cat with flow control both ways */
	current = "stdin flow control";
	struct xreq c = { .argv = { "cat" }, .stdin_on = 1, .window = 65536 };
	id = send_exec(a, &c);
	const size_t total = 1 << 20;
	size_t sent = 0, got = 0, credit = 262144;
	int ok = 1, exited = 0, fin = 0;
	uint8_t chunk[32768];
	int64_t end = now_ms() + 8000;
	while (!exited && now_ms() < end) {
		if (sent < total && credit > 0) {
			size_t k = total - sent;
			if (k > sizeof chunk)
				k = sizeof chunk;
			if (k > credit)
				k = credit;
			for (size_t i = 0; i < k; i++)
				chunk[i] = (uint8_t)((sent + i) * 7);
			send_frame(a, id, SM_STDIN, sent + k == total ? SM_FLAG_FIN : 0, chunk, k);
			sent += k;
			credit -= k;
			CHECK(credit <= 262144, "credit accounting");
		}
		struct frame f;
		int rc = recv_frame(a, &f, sent < total && credit > 0 ? 0 : 2000);
		if (rc == -1)
			continue;
		if (rc)
			break;
		if (f.h.stream != id)
			continue;
		if (f.h.type == SM_WINDOW)
			credit += sm_be32(f.p);
		else if (f.h.type == SM_STDOUT) {
			for (size_t i = 0; i < f.h.length && ok; i++)
				ok = f.p[i] == (uint8_t)((got + i) * 7);
			got += f.h.length;
			if (f.h.length)
				send_window(a, id, f.h.length + SM_FRAME_COST);
			fin |= f.h.flags & SM_FLAG_FIN;
		} else if (f.h.type == SM_EXIT) {
			exited = 1;
		}
	}
	CHECK(exited && fin, "the 1 MiB cat finished");
	CHECK(got == total && ok, "1 MiB came back intact (%zu bytes)", got);
}

static void test_output_credit(struct agent *a)
{
	current = "output credit";
	/* Each frame costs its length plus SM_FRAME_COST: 1000 bytes in one frame use the window up. */
	struct xreq x = { .argv = { "head", "-c", "300000", "/dev/zero" }, .window = 1000 + SM_FRAME_COST };
	uint32_t id = send_exec(a, &x);
	struct frame f;
	size_t got = 0, charged = 0;
	int started = 0, rc;
	while ((rc = recv_frame(a, &f, 300)) == 0 || !started) {
		if (rc) {
			fail("timeout waiting for the output granted");
			return;
		}
		if (f.h.type == SM_STARTED)
			started = 1;
		else if (f.h.type == SM_STDOUT) {
			got += f.h.length;
			charged += f.h.length + SM_FRAME_COST;
		}
	}
	CHECK(got > 0 && charged <= 1000 + SM_FRAME_COST && 1000 + SM_FRAME_COST - charged <= SM_FRAME_COST,
	      "the output stops at the window (%zu bytes, %zu charged)", got, charged);
	send_window(a, id, 400000);
	collect_from(a, id, &R, 5000, 1);
	CHECK(got + R.total_out == 300000 && R.code == 0, "the rest after WINDOW: %llu",
	      (unsigned long long)(got + R.total_out));
}

static void test_stage_chain(struct agent *a)
{
	current = "stage and chain";
	char script[300], data[300], nested[300];
	snprintf(script, sizeof script, "%s/stage/bin/run.sh", tmpdir);
	snprintf(data, sizeof data, "%s/stage/data.txt", tmpdir);
	snprintf(nested, sizeof nested, "%s/stage/empty", tmpdir);
	struct xreq x = {
		.argv = { script, "one" },
		.chain = { { "sh", "-c", "echo two" }, { "cat", data } },
		.stage = { { script, 0755, "#!/bin/sh\necho \"run $1\"\n" }, { data, 0600, "three\n" }, { nested, 0, "" } },
	};
	struct result *r = run(a, &x, 15000);
	CHECK(!strcmp(r->out, "run one\ntwo\nthree\n"), "staged script, chain output: '%s' %s", r->out, r->msg);
	CHECK(r->exited && r->code == 0 && r->step == 2, "exit 0 at step 2 (got %d at %u)", r->code, r->step);
	struct stat st;
	CHECK(stat(data, &st) == 0 && (st.st_mode & 07777) == 0600, "staged mode 0600");
	CHECK(stat(nested, &st) == 0 && st.st_size == 0 && (st.st_mode & 07777) == 0644, "empty staged file, 0644");

	current = "chain stops on failure";
	struct xreq s = { .argv = { "sh", "-c", "echo first; exit 4" }, .chain = { { "echo", "never" } } };
	r = run(a, &s, 15000);
	CHECK(r->code == 4 && r->step == 0 && !strcmp(r->out, "first\n"), "exit 4 at step 0, no second step");

	current = "chain missing binary";
	struct xreq m = { .argv = { "true" }, .chain = { { "/nonexistent/tool", "x" } } };
	r = run(a, &m, 15000);
	CHECK(r->code == 127 && r->step == 1, "exit 127 at step 1 (got %d at %u)", r->code, r->step);
	CHECK(strstr(r->err, "/nonexistent/tool") != NULL, "message on stderr: '%s'", r->err);

	current = "stage size mismatch";
	char bad[300];
	snprintf(bad, sizeof bad, "%s/stage/bad", tmpdir);
	uint32_t id = a->next_id++;
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	sm_put_str(&b, 1, "true");
	size_t mk = sm_nested_begin(&b, 13);
	sm_put_str(&b, 1, bad);
	sm_put_u64(&b, 3, 10);
	sm_nested_end(&b, mk);
	send_buf(a, &b, id, SM_EXEC);
	sm_buf_free(&b);
	send_frame(a, id, SM_STAGE_DATA, SM_FLAG_FIN, "12345", 5);
	collect(a, id, &R, 3000);
	CHECK(R.error == SM_E_BAD_REQUEST && !R.started, "short staged file: BAD_REQUEST (got %d)", R.error);
	char dir[300];
	snprintf(dir, sizeof dir, "%s/stage", tmpdir);
	DIR *d = opendir(dir);
	int leftovers = 0;
	for (struct dirent *e; d && (e = readdir(d));)
		leftovers += !strncmp(e->d_name, ".sm-", 4) || !strcmp(e->d_name, "bad");
	if (d)
		closedir(d);
	CHECK(leftovers == 0, "no temporary or partial file left behind");
}

static void test_timeout(struct agent *a)
{
	current = "timeout kills the tree";
	struct xreq x = { .argv = { "sh", "-c", "sleep 30 & echo $!; sleep 30" }, .timeout_ms = 300 };
	int64_t t0 = now_ms();
	struct result *r = run(a, &x, 15000);
	int64_t took = now_ms() - t0;
	CHECK(r->exited && r->timed_out == 1 && r->has_signal && r->signal == SIGTERM,
	      "timedOut, killed by SIGTERM (signal %u)", r->signal);
	CHECK(took >= 250 && took < 10000, "took %lld ms", (long long)took);
	pid_t bg = (pid_t)atoi(r->out);
	CHECK(bg > 0 && process_gone(bg, 5000), "the background sleep %d is gone", (int)bg);

	current = "timeout grace then SIGKILL";
	struct xreq g = { .argv = { "sh", "-c", "trap '' TERM; sleep 30 & echo $!; sleep 30; sleep 30" },
			  .timeout_ms = 200,
			  .grace_ms = 300 };
	t0 = now_ms();
	r = run(a, &g, 15000);
	took = now_ms() - t0;
	CHECK(r->exited && r->timed_out == 1 && r->signal == SIGKILL, "SIGKILL after the grace (signal %u)", r->signal);
	CHECK(took >= 450 && took < 10000, "took %lld ms (timeout + grace)", (long long)took);
	bg = (pid_t)atoi(r->out);
	CHECK(bg > 0 && process_gone(bg, 5000), "the TERM-ignoring background sleep %d is gone", (int)bg);
}

static void test_signal_reset(struct agent *a)
{
	current = "SIGNAL";
	struct xreq x = { .argv = { "sleep", "30" } };
	uint32_t id = send_exec(a, &x);
	struct frame f;
	if (expect(a, &f, id, SM_STARTED, 3000))
		return;
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	sm_put_u32(&b, 1, SIGUSR1);
	send_buf(a, &b, id, SM_SIGNAL);
	collect_from(a, id, &R, 3000, 1);
	CHECK(R.exited && R.has_signal && R.signal == SIGUSR1 && !R.has_code, "killed by SIGUSR1 (%u)", R.signal);

	current = "RESET";
	id = send_exec(a, &x);
	if (expect(a, &f, id, SM_STARTED, 3000))
		return;
	pid_t pid = (pid_t)fu(&f, 1, 0);
	send_frame(a, id, SM_RESET, 0, NULL, 0);
	/* frames still in flight for the stream are ignored, not errors */
	send_window(a, id, 10);
	send_frame(a, 0, SM_PING, 0, "r", 1);
	if (expect(a, &f, 0, SM_PONG, 2000) == 0)
		CHECK(1, "nothing more on the reset stream");
	CHECK(process_gone(pid, 5000), "the reset exec's process is gone");
	sm_buf_free(&b);

	current = "tty";
	struct xreq t = { .argv = { "sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty; read x; stty size" },
			  .tty = 1,
			  .stdin_on = 1 };
	id = send_exec(a, &t);
	if (expect(a, &f, id, SM_STARTED, 3000))
		return;
	sm_frame_begin(&b);
	sm_put_u16(&b, 1, 40);
	sm_put_u16(&b, 2, 100);
	send_buf(a, &b, id, SM_RESIZE);
	sm_buf_free(&b);
	send_frame(a, id, SM_STDIN, 0, "go\n", 3);
	/* collect() expects STARTED first: emulate it */
	memset(&R, 0, sizeof R);
	char out[4096] = "";
	size_t n = 0;
	int fin = 0, exited = 0, stderr_seen = 0;
	while (!exited && recv_frame(a, &f, 3000) == 0) {
		if (f.h.stream != id)
			continue;
		if (f.h.type == SM_STDOUT) {
			size_t k = f.h.length < sizeof out - 1 - n ? f.h.length : sizeof out - 1 - n;
			memcpy(out + n, f.p, k);
			n += k;
			out[n] = 0;
			fin |= f.h.flags & SM_FLAG_FIN;
		} else if (f.h.type == SM_STDERR) {
			stderr_seen = 1;
		} else if (f.h.type == SM_EXIT) {
			exited = 1;
			CHECK(fu(&f, 1, 99) == 0, "tty exec exits 0");
		}
	}
	CHECK(exited && fin && !stderr_seen, "tty: STDOUT FIN, no STDERR at all, EXIT");
	CHECK(strstr(out, "is-a-tty") && strstr(out, "40 100"), "tty output and resized winsize: '%s'", out);
}

static void test_files(struct agent *a)
{
	current = "write file";
	char path[300];
	snprintf(path, sizeof path, "%s/files/a/b/c.txt", tmpdir);
	uint32_t id = a->next_id++;
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	sm_put_str(&b, 1, path);
	sm_put_u32(&b, 2, 0640);
	sm_put_u64(&b, 5, 11);
	sm_put_u8(&b, 6, 1);
	send_buf(a, &b, id, SM_WRITE_FILE);
	send_frame(a, id, SM_FILE_DATA, 0, "hello ", 6);
	send_frame(a, id, SM_FILE_DATA, SM_FLAG_FIN, "world", 5);
	struct frame f;
	if (expect(a, &f, id, SM_OK, 3000) == 0)
		CHECK(fu(&f, 1, 0) == 11, "OK size 11");
	struct stat st;
	CHECK(stat(path, &st) == 0 && st.st_size == 11 && (st.st_mode & 07777) == 0640, "file on disk, mode 0640");

	current = "read file";
	id = a->next_id++;
	sm_frame_begin(&b);
	sm_put_str(&b, 1, path);
	sm_put_u32(&b, 2, 4 + SM_FRAME_COST);
	send_buf(a, &b, id, SM_READ_FILE);
	if (expect(a, &f, id, SM_FILE_INFO, 3000) == 0)
		CHECK(fu(&f, 1, 0) == 11 && fu(&f, 2, 0) == (S_IFREG | 0640), "FILE_INFO size and st_mode");
	if (expect(a, &f, id, SM_FILE_DATA, 3000) == 0)
		CHECK(f.h.length == 4 && !memcmp(f.p, "hell", 4) && !(f.h.flags & SM_FLAG_FIN), "4 bytes within credit");
	CHECK(recv_frame(a, &f, 200) == -1, "nothing more without credit");
	send_window(a, id, 100);
	if (expect(a, &f, id, SM_FILE_DATA, 3000) == 0)
		CHECK(f.h.length == 7 && !memcmp(f.p, "o world", 7) && (f.h.flags & SM_FLAG_FIN), "the rest, with FIN");

	current = "read empty file";
	char empty[300];
	snprintf(empty, sizeof empty, "%s/files/empty", tmpdir);
	close(open(empty, O_CREAT | O_WRONLY, 0600));
	id = a->next_id++;
	sm_frame_begin(&b);
	sm_put_str(&b, 1, empty);
	send_buf(a, &b, id, SM_READ_FILE);
	if (expect(a, &f, id, SM_FILE_INFO, 3000) == 0)
		CHECK(fu(&f, 1, 1) == 0, "size 0");
	if (expect(a, &f, id, SM_FILE_DATA, 3000) == 0)
		CHECK(f.h.length == 0 && (f.h.flags & SM_FLAG_FIN), "one empty FIN frame");

	current = "read errors";
	id = a->next_id++;
	sm_frame_begin(&b);
	sm_put_str(&b, 1, "/nonexistent/file");
	send_buf(a, &b, id, SM_READ_FILE);
	if (expect(a, &f, id, SM_ERROR, 3000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_NOT_FOUND && fu(&f, 2, 0) == ENOENT, "missing file: NOT_FOUND");
	id = a->next_id++;
	sm_frame_begin(&b);
	sm_put_str(&b, 1, tmpdir);
	send_buf(a, &b, id, SM_READ_FILE);
	if (expect(a, &f, id, SM_ERROR, 3000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_IO, "directory: IO");

	current = "write errors";
	char nodir[300];
	snprintf(nodir, sizeof nodir, "%s/files/missing/x", tmpdir);
	id = a->next_id++;
	sm_frame_begin(&b);
	sm_put_str(&b, 1, nodir);
	sm_put_u64(&b, 5, 1);
	send_buf(a, &b, id, SM_WRITE_FILE);
	send_frame(a, id, SM_FILE_DATA, SM_FLAG_FIN, "x", 1); /* in flight after the ERROR: ignored */
	if (expect(a, &f, id, SM_ERROR, 3000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_IO && fu(&f, 2, 0) == ENOENT, "no parent without mkdirs: IO/ENOENT");
	char over[300];
	snprintf(over, sizeof over, "%s/files/over", tmpdir);
	id = a->next_id++;
	sm_frame_begin(&b);
	sm_put_str(&b, 1, over);
	sm_put_u64(&b, 5, 3);
	send_buf(a, &b, id, SM_WRITE_FILE);
	send_frame(a, id, SM_FILE_DATA, SM_FLAG_FIN, "12345", 5);
	if (expect(a, &f, id, SM_ERROR, 3000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_BAD_REQUEST, "more data than size refused");
	CHECK(access(over, F_OK) < 0, "nothing written at the target");
	char dir[300];
	snprintf(dir, sizeof dir, "%s/files", tmpdir);
	DIR *d = opendir(dir);
	int leftovers = 0;
	for (struct dirent *e; d && (e = readdir(d));)
		leftovers += !strncmp(e->d_name, ".sm-", 4);
	if (d)
		closedir(d);
	CHECK(leftovers == 0, "temporary file removed");

	current = "big file round trip";
	char bigp[300];
	snprintf(bigp, sizeof bigp, "%s/files/big", tmpdir);
	const size_t total = 3u << 20;
	uint8_t *data = malloc(total);
	for (size_t i = 0; i < total; i++)
		data[i] = (uint8_t)(i * 13 + (i >> 12));
	id = a->next_id++;
	sm_frame_begin(&b);
	sm_put_str(&b, 1, bigp);
	sm_put_u64(&b, 5, total);
	send_buf(a, &b, id, SM_WRITE_FILE);
	for (size_t off = 0; off < total; off += SM_MAX_PAYLOAD)
		send_frame(a, id, SM_FILE_DATA, off + SM_MAX_PAYLOAD >= total ? SM_FLAG_FIN : 0, data + off,
			   total - off < SM_MAX_PAYLOAD ? total - off : SM_MAX_PAYLOAD);
	if (expect(a, &f, id, SM_OK, 5000) == 0)
		CHECK(fu(&f, 1, 0) == total, "3 MiB written");
	id = a->next_id++;
	sm_frame_begin(&b);
	sm_put_str(&b, 1, bigp);
	sm_put_u32(&b, 2, 1 << 20);
	send_buf(a, &b, id, SM_READ_FILE);
	expect(a, &f, id, SM_FILE_INFO, 3000);
	size_t got = 0;
	int ok = 1, fin = 0;
	while (!fin && recv_frame(a, &f, 3000) == 0) {
		if (f.h.stream != id || f.h.type != SM_FILE_DATA) {
			fail("unexpected %s", sm_type_name(f.h.type));
			break;
		}
		ok = ok && got + f.h.length <= total && !memcmp(f.p, data + got, f.h.length);
		got += f.h.length;
		fin = f.h.flags & SM_FLAG_FIN;
		send_window(a, id, f.h.length + SM_FRAME_COST);
	}
	CHECK(fin && got == total && ok, "3 MiB read back intact (%zu)", got);
	free(data);
	sm_buf_free(&b);
}

static void test_session_reset(void)
{
	current = "new HELLO abandons streams";
	struct agent a;
	start(&a);
	hello(&a, 1);
	struct xreq x = { .argv = { "sleep", "30" } };
	uint32_t id = send_exec(&a, &x);
	struct frame f;
	if (expect(&a, &f, id, SM_STARTED, 3000) == 0) {
		pid_t pid = (pid_t)fu(&f, 1, 0);
		hello(&a, 2); /* the next frame must be the HELLO answer, nothing for the old stream */
		CHECK(process_gone(pid, 5000), "the previous session's process is gone");
	}
	/* ids start over in the new session */
	struct result *r = run(&a, &(struct xreq){ .argv = { "true" } }, 3000);
	CHECK(r->exited && r->code == 0, "stream 1 usable again after HELLO");

	current = "channel EOF kills processes";
	id = send_exec(&a, &x);
	if (expect(&a, &f, id, SM_STARTED, 3000) == 0) {
		pid_t pid = (pid_t)fu(&f, 1, 0);
		int st = stop(&a);
		CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "agent exit 0 on EOF");
		CHECK(process_gone(pid, 5000), "its process is gone");
	} else {
		stop(&a);
	}

	current = "bad frame";
	start(&a);
	hello(&a, 1);
	send_frame(&a, 0, SM_PING, 0x02, NULL, 0);
	if (expect(&a, &f, 0, SM_ERROR, 2000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_BAD_FRAME, "reserved flag: BAD_FRAME");
	CHECK(recv_frame(&a, &f, 2000) == -2, "the agent closes the channel");
	int st = stop(&a);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 1, "host mode exits 1 after a bad frame (0x%x)", st);

	current = "oversized frame";
	start(&a);
	hello(&a, 1);
	uint8_t hdr[SM_HDR_SIZE];
	struct sm_hdr h = { SM_MAX_PAYLOAD + 1, 1, SM_STDIN, 0 };
	sm_hdr_encode(hdr, &h);
	send_raw(&a, hdr, sizeof hdr);
	if (expect(&a, &f, 0, SM_ERROR, 2000) == 0)
		CHECK(fu(&f, 1, 0) == SM_E_BAD_FRAME, "length over MAX_PAYLOAD: BAD_FRAME without waiting for it");
	stop(&a);

	current = "shutdown (host mode)";
	start(&a);
	hello(&a, 1);
	send_frame(&a, 0, SM_SHUTDOWN, 0, NULL, 0);
	expect(&a, &f, 0, SM_OK, 3000);
	st = stop(&a);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit 0 after SHUTDOWN");
}

static void test_background_holders(struct agent *a)
{
	current = "background process holding the pipes";
	struct xreq x = { .argv = { "sh", "-c", "sleep 3 & echo done" } };
	int64_t t0 = now_ms();
	struct result *r = run(a, &x, 15000);
	int64_t took = now_ms() - t0;
	CHECK(r->exited && r->code == 0 && !strcmp(r->out, "done\n"), "output and exit: '%s'", r->out);
	CHECK(took < 2500, "EXIT does not wait for the background sleep (%lld ms)", (long long)took);

	current = "background process holding the tty";
	struct xreq t = { .argv = { "sh", "-c", "sleep 3 & echo done" }, .tty = 1 };
	uint32_t id = send_exec(a, &t);
	t0 = now_ms();
	struct frame f;
	char out[256] = "";
	size_t n = 0;
	int exited = 0;
	while (!exited && recv_frame(a, &f, 15000) == 0) {
		if (f.h.type == SM_STDOUT && f.h.length < sizeof out - n) {
			memcpy(out + n, f.p, f.h.length);
			n += f.h.length;
		}
		exited = f.h.stream == id && f.h.type == SM_EXIT;
	}
	took = now_ms() - t0;
	CHECK(exited && strstr(out, "done"), "tty output '%s'", out);
	CHECK(took < 2500, "tty EXIT does not wait for the background sleep (%lld ms)", (long long)took);
}

static void test_channel_path(void)
{
	current = "--channel PATH (unix socket)";
	char path[100];
	if ((size_t)snprintf(path, sizeof path, "%s/agent.sock", tmpdir) >= sizeof path) {
		fail("temporary directory name too long");
		return;
	}
	int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	memcpy(sa.sun_path, path, strlen(path) + 1);
	if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 1) < 0) {
		fail("bind %s: %s", path, strerror(errno));
		return;
	}
	struct agent a;
	memset(&a, 0, sizeof a);
	a.pid = fork();
	if (a.pid == 0) {
		execl(agent_bin, agent_bin, "--channel", path, (char *)NULL);
		_exit(127);
	}
	a.fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
	close(ls);
	a.buf = malloc(SM_HDR_SIZE + SM_MAX_PAYLOAD);
	hello(&a, 3);
	struct frame f;
	send_frame(&a, 0, SM_PING, 0, "p", 1);
	expect(&a, &f, 0, SM_PONG, 3000);
	int st = stop(&a);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit 0 (0x%x)", st);
}

static void test_many_streams(struct agent *a)
{
	current = "concurrent execs";
	uint32_t ids[20];
	struct xreq x = { .argv = { "sh", "-c", "echo $0", "x" } };
	for (int i = 0; i < 20; i++)
		ids[i] = send_exec(a, &x);
	int exits = 0;
	struct frame f;
	while (exits < 20 && recv_frame(a, &f, 5000) == 0) {
		CHECK(f.h.stream >= ids[0] && f.h.stream <= ids[19], "frame for one of the streams");
		exits += f.h.type == SM_EXIT;
	}
	CHECK(exits == 20, "20 concurrent execs finished (%d)", exits);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: test-agent PATH-TO-SM-INIT\n");
		return 2;
	}
	agent_bin = argv[1];
	signal(SIGPIPE, SIG_IGN);
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	snprintf(tmpdir, sizeof tmpdir, "/tmp/sm-agent-test.XXXXXX");
	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 2;
	}
	char p[300];
	snprintf(p, sizeof p, "%s/files", tmpdir);
	mkdir(p, 0755);
	int64_t t0 = now_ms();

	test_hello_ping();
	struct agent a;
	start(&a);
	hello(&a, 7);
	test_exec_basic(&a);
	test_stdin(&a);
	test_output_credit(&a);
	test_stage_chain(&a);
	test_timeout(&a);
	test_signal_reset(&a);
	test_files(&a);
	test_many_streams(&a);
	test_background_holders(&a);
	test_tcp(&a);
	test_fs(&a);
	test_watch(&a);
	int st = stop(&a);
	current = "end";
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "agent exit status 0x%x", st);
	test_session_reset();
	test_channel_path();
	test_workload();

	char cmd[400];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", tmpdir);
	printf("test-agent: %d checks, %d failures, %lld ms\n", checks, failures, (long long)(now_ms() - t0));
	return failures ? 1 : 0;
}
