/* Exec streams: staging, process start (pipes or pty, user, cwd, PATH lookup), chains, stdio
 * pumping within the credit, timeouts, signals, exit reporting. */
#define _GNU_SOURCE
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define TTY_DRAIN_NS 50000000 /* after the last step of a tty exec: wait this long for the pty to hang up */

static struct sm_field xf[SM_MAX_FIELDS];
static struct sm_field nf_[SM_MAX_FIELDS];

static void closefd(int *fd)
{
	if (*fd >= 0) {
		close(*fd);
		*fd = -1;
	}
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

void sm_kill_group(pid_t pgid, int sig)
{
	if (pgid > 0)
		kill(-pgid, sig);
}

/* Signal the current step: its group, and the process itself while it is not in that group yet
 * (it may not have called setsid). Once it leads its group it cannot leave it, so the group's
 * signal reached it: a second one would be a second delivery (a shell that ran its trap for the
 * first would run it again). Checked before the group's signal, so a setsid in between costs at
 * most a second delivery, never a missed one. */
static void signal_step(struct sm_stream *s, int sig)
{
	int direct = s->pid > 0 && getpgid(s->pid) != s->pgid;
	sm_kill_tree(s->pgid, s->cgroup, sig);
	if (direct)
		kill(s->pid, sig);
}

/* ------------------------------------------------------------------------------------------------
 * Request parsing.
 */

static char *arena_str(char **at, const struct sm_field *f)
{
	char *s = *at;
	memcpy(s, f->val, f->len);
	s[f->len] = 0;
	*at += f->len + 1;
	return s;
}

static void free_exec(struct sm_stream *s)
{
	if (s->steps) {
		for (uint32_t i = 0; i < s->nsteps; i++)
			free(s->steps[i]);
		free(s->steps);
		s->steps = NULL;
	}
	if (s->stages) {
		for (uint32_t i = 0; i < s->nstages; i++)
			free(s->stages[i].path);
		free(s->stages);
		s->stages = NULL;
	}
	free(s->env);
	s->env = NULL;
	free(s->home_env);
	s->home_env = NULL;
	free(s->arena);
	s->arena = NULL;
	free(s->inq);
	s->inq = NULL;
}

static void start_first(struct sm_stream *s);
static int open_stage(struct sm_stream *s);

void sm_exec_open(uint32_t id, const uint8_t *p, size_t n)
{
	static const struct sm_spec spec[] = {
		{ 1, SM_K_STRING, SM_REQ | SM_REP },
		{ 2, SM_K_STRING, SM_REP },
		{ 3, SM_K_STRING, 0 },
		{ 4, SM_K_STRING, 0 },
		{ 5, SM_K_U8, 0 },
		{ 6, SM_K_U16, 0 },
		{ 7, SM_K_U16, 0 },
		{ 8, SM_K_U32, 0 },
		{ 9, SM_K_U32, 0 },
		{ 10, SM_K_NESTED, SM_REP },
		{ 11, SM_K_U8, 0 },
		{ 12, SM_K_U32, 0 },
		{ 13, SM_K_NESTED, SM_REP },
	};
	static const struct sm_spec chain_spec[] = { { 1, SM_K_STRING, SM_REQ | SM_REP } };
	static const struct sm_spec stage_spec[] = {
		{ 1, SM_K_STRING, SM_REQ },
		{ 2, SM_K_U32, 0 },
		{ 3, SM_K_U64, SM_REQ },
	};
	char err[256];
	int nf = sm_fields_split(p, n, xf, SM_MAX_FIELDS);
	if (nf < 0) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "EXEC: malformed fields");
		return;
	}
	if (sm_fields_check(xf, nf, spec, sizeof spec / sizeof spec[0], err, sizeof err)) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "EXEC: %s", err);
		return;
	}
	uint32_t nargv = 0, nenv = 0, nchain = 0, nstage = 0;
	for (int i = 0; i < nf; i++) {
		switch (xf[i].tag) {
		case 1: nargv++; break;
		case 2: nenv++; break;
		case 10: nchain++; break;
		case 13: nstage++; break;
		default: break;
		}
	}

	struct sm_stream tmp;
	memset(&tmp, 0, sizeof tmp);
	struct sm_stream *x = &tmp;
	x->arena = malloc(n + 1);
	x->steps = calloc(1 + nchain, sizeof *x->steps);
	x->env = calloc(nenv + 2, sizeof *x->env);
	x->stages = nstage ? calloc(nstage, sizeof *x->stages) : NULL;
	if (x->steps)
		x->steps[0] = calloc(nargv + 1, sizeof(char *));
	if (!x->arena || !x->steps || !x->env || (nstage && !x->stages) || !x->steps[0]) {
		sm_send_error(id, SM_E_START_FAILED, ENOMEM, "EXEC: out of memory");
		goto fail;
	}
	x->nsteps = 1 + nchain;
	x->nstages = nstage;
	char *at = x->arena;
	uint32_t ia = 0, ie = 0, ic = 0, is = 0;
	const char *user = NULL;
	int has_home = 0;
	x->cwd = NULL;
	x->rows = 24;
	x->cols = 80;
	x->grace_ms = 2000;
	x->out_credit = SM_DEFAULT_WINDOW;
	for (int i = 0; i < nf; i++) {
		const struct sm_field *f = &xf[i];
		switch (f->tag) {
		case 1: x->steps[0][ia++] = arena_str(&at, f); break;
		case 2:
			x->env[ie] = arena_str(&at, f);
			if (!strncmp(x->env[ie], "HOME=", 5))
				has_home = 1;
			ie++;
			break;
		case 3: x->cwd = arena_str(&at, f); break;
		case 4: user = arena_str(&at, f); break;
		case 5: x->tty = f->val[0] != 0; break;
		case 6: x->rows = (uint16_t)sm_uval(f); break;
		case 7: x->cols = (uint16_t)sm_uval(f); break;
		case 8: x->timeout_ms = (uint32_t)sm_uval(f); break;
		case 9: x->grace_ms = (uint32_t)sm_uval(f); break;
		case 11: x->stdin_on = f->val[0] != 0; break;
		case 12: x->out_credit = sm_uval(f); break;
		case 10: {
			int k = sm_fields_split(f->val, f->len, nf_, SM_MAX_FIELDS);
			if (k < 0 || sm_fields_check(nf_, k, chain_spec, 1, err, sizeof err)) {
				sm_send_error(id, SM_E_BAD_REQUEST, 0, "EXEC: chain %u: %s", ic, k < 0 ? "malformed" : err);
				goto fail;
			}
			uint32_t c = 0;
			for (int j = 0; j < k; j++)
				c += nf_[j].tag == 1;
			char **argv = calloc(c + 1, sizeof *argv);
			if (!argv) {
				sm_send_error(id, SM_E_START_FAILED, ENOMEM, "EXEC: out of memory");
				goto fail;
			}
			x->steps[1 + ic++] = argv;
			c = 0;
			for (int j = 0; j < k; j++)
				if (nf_[j].tag == 1)
					argv[c++] = arena_str(&at, &nf_[j]);
			break;
		}
		case 13: {
			int k = sm_fields_split(f->val, f->len, nf_, SM_MAX_FIELDS);
			if (k < 0 || sm_fields_check(nf_, k, stage_spec, 3, err, sizeof err)) {
				sm_send_error(id, SM_E_BAD_REQUEST, 0, "EXEC: stage %u: %s", is, k < 0 ? "malformed" : err);
				goto fail;
			}
			struct sm_stage *st = &x->stages[is++];
			const struct sm_field *pf = sm_find(nf_, k, 1);
			st->mode = (uint32_t)sm_get_u(nf_, k, 2, 0644);
			st->size = sm_get_u(nf_, k, 3, 0);
			st->path = malloc(pf->len + 1);
			if (!st->path) {
				sm_send_error(id, SM_E_START_FAILED, ENOMEM, "EXEC: out of memory");
				goto fail;
			}
			memcpy(st->path, pf->val, pf->len);
			st->path[pf->len] = 0;
			break;
		}
		default:
			break;
		}
	}
	if (!x->cwd || !*x->cwd)
		x->cwd = "/";
	for (uint32_t i = 0; i < x->nsteps; i++) {
		if (!x->steps[i][0] || !*x->steps[i][0]) {
			sm_send_error(id, SM_E_BAD_REQUEST, 0, "EXEC: step %u has an empty argv[0]", i);
			goto fail;
		}
	}
	if (x->rows == 0 || x->cols == 0) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "EXEC: rows and cols must be positive");
		goto fail;
	}
	for (uint32_t i = 0; i < x->nstages; i++) {
		struct sm_stage *st = &x->stages[i];
		if (!*st->path || (st->mode & ~07777u)) {
			sm_send_error(id, SM_E_BAD_REQUEST, 0, "EXEC: stage %u: empty path or bad mode", i);
			goto fail;
		}
		if (st->path[0] != '/') { /* relative to cwd */
			size_t l = strlen(x->cwd) + 1 + strlen(st->path) + 1;
			char *abs = malloc(l);
			if (!abs) {
				sm_send_error(id, SM_E_START_FAILED, ENOMEM, "EXEC: out of memory");
				goto fail;
			}
			snprintf(abs, l, "%s/%s", x->cwd, st->path);
			free(st->path);
			st->path = abs;
		}
	}
	char msg[512];
	int e = sm_resolve_user(user, &x->user, msg, sizeof msg);
	if (e) {
		sm_send_error(id, SM_E_START_FAILED, e, "%s", msg);
		goto fail;
	}
	if (!has_home) {
		size_t l = strlen(x->user.home) + 6;
		x->home_env = malloc(l);
		if (!x->home_env) {
			sm_send_error(id, SM_E_START_FAILED, ENOMEM, "EXEC: out of memory");
			goto fail;
		}
		snprintf(x->home_env, l, "HOME=%s", x->user.home);
		x->env[ie++] = x->home_env;
	}

	struct sm_stream *s = sm_stream_new(id, SK_EXEC);
	if (!s) {
		sm_send_error(id, SM_E_START_FAILED, ENOMEM, "EXEC: out of memory");
		goto fail;
	}
	/* move the parsed request into the live stream */
	s->arena = x->arena;
	s->steps = x->steps;
	s->nsteps = x->nsteps;
	s->env = x->env;
	s->home_env = x->home_env;
	s->cwd = x->cwd;
	s->user = x->user;
	s->tty = x->tty;
	s->rows = x->rows;
	s->cols = x->cols;
	s->timeout_ms = x->timeout_ms;
	s->grace_ms = x->grace_ms;
	s->stdin_on = x->stdin_on;
	s->out_credit = x->out_credit;
	s->stages = x->stages;
	s->nstages = x->nstages;
	s->start_ns = sm_now_ns();
	if (s->timeout_ms)
		s->deadline_ns = s->start_ns + (int64_t)s->timeout_ms * 1000000;
	if (s->nstages) {
		s->state = X_STAGING;
		open_stage(s);
	} else {
		start_first(s);
	}
	return;
fail:
	free_exec(x);
}

/* ------------------------------------------------------------------------------------------------
 * Staging.
 */

static int open_stage(struct sm_stream *s)
{
	struct sm_stage *st = &s->stages[s->stage_i];
	char msg[512];
	int e = sm_fw_open(&s->w, st->path, st->mode, s->user.uid, s->user.gid, 1, msg, sizeof msg);
	if (e) {
		sm_send_error(s->id, SM_E_IO, e, "staging %s", msg);
		sm_stream_close(s, 1);
		return -1;
	}
	s->w.size = st->size;
	s->stage_open = 1;
	return 0;
}

static void stage_data(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p)
{
	struct sm_stage *st = &s->stages[s->stage_i];
	if (s->w.written + h->length > st->size) {
		sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "staged file %s: more than its %llu bytes", st->path,
			      (unsigned long long)st->size);
		sm_stream_close(s, 1);
		return;
	}
	if (sm_fw_write(&s->w, p, h->length)) {
		sm_send_error(s->id, SM_E_IO, errno, "staging %s: %s", st->path, strerror(errno));
		sm_stream_close(s, 1);
		return;
	}
	if (!(h->flags & SM_FLAG_FIN))
		return;
	if (s->w.written != st->size) {
		sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "staged file %s: %llu bytes, expected %llu", st->path,
			      (unsigned long long)s->w.written, (unsigned long long)st->size);
		sm_stream_close(s, 1);
		return;
	}
	s->stage_open = 0;
	if (sm_fw_finish(&s->w)) {
		sm_send_error(s->id, SM_E_IO, errno, "staging %s: %s", st->path, strerror(errno));
		sm_stream_close(s, 1);
		return;
	}
	if (++s->stage_i < s->nstages) {
		open_stage(s);
		return;
	}
	start_first(s);
}

/* ------------------------------------------------------------------------------------------------
 * Starting processes.
 */

static int path_exec(char **argv, char **env)
{
	const char *file = argv[0];
	if (strchr(file, '/')) {
		execve(file, argv, env);
		return errno;
	}
	const char *path = DEFAULT_PATH;
	for (char **e = env; *e; e++)
		if (!strncmp(*e, "PATH=", 5))
			path = *e + 5;
	size_t fl = strlen(file);
	int seen_eacces = 0;
	char buf[PATH_MAX];
	for (const char *p = path;; p++) {
		const char *z = strchrnul(p, ':');
		size_t dl = (size_t)(z - p);
		if (dl + 1 + fl + 1 <= sizeof buf) {
			if (dl) {
				memcpy(buf, p, dl);
				buf[dl] = '/';
				memcpy(buf + dl + 1, file, fl + 1);
			} else {
				memcpy(buf, file, fl + 1); /* empty entry: the current directory */
			}
			execve(buf, argv, env);
			switch (errno) {
			case EACCES:
				seen_eacces = 1;
				break;
			case ENOENT: case ENOTDIR: case ENAMETOOLONG: case ELOOP: case ESTALE:
				break;
			default:
				return errno;
			}
		}
		if (!*z)
			break;
		p = z;
	}
	return seen_eacces ? EACCES : ENOENT;
}

static void __attribute__((noreturn)) child_fail(int errw, const char *what, int kind, int err)
{
	if (errw >= 0) {
		int32_t rep[2] = { kind, err };
		ssize_t w = write(errw, rep, sizeof rep);
		(void)w;
		_exit(127);
	}
	char line[PATH_MAX + 128];
	int n = snprintf(line, sizeof line, "sm-init: %s: %s\n", what, strerror(err));
	if (n > 0) {
		ssize_t w = write(2, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
		(void)w;
	}
	_exit(kind == CE_EXEC && err == ENOENT ? 127 : 126);
}

static void __attribute__((noreturn)) child(const struct sm_spawn *sp)
{
	int errw = sp->errw;
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL);
	if (A.host_mode)
		prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (setsid() < 0)
		child_fail(errw, "setsid", CE_SETUP, errno);
	if (sp->cgroup_procs >= 0 && write(sp->cgroup_procs, "0", 1) < 0)
		child_fail(errw, "joining its cgroup", CE_SETUP, errno);
	if (sp->tty >= 0) {
		if (ioctl(sp->tty, TIOCSCTTY, 0) < 0 && ioctl(sp->tty, TIOCSCTTY, 1) < 0)
			child_fail(errw, "controlling terminal", CE_SETUP, errno);
		if (dup2(sp->tty, 0) < 0 || dup2(sp->tty, 1) < 0 || dup2(sp->tty, 2) < 0)
			child_fail(errw, "dup2", CE_SETUP, errno);
	} else {
		int in = sp->in;
		if (in < 0)
			in = open("/dev/null", O_RDONLY | O_CLOEXEC);
		if (in < 0)
			child_fail(errw, "/dev/null", CE_SETUP, errno);
		if (dup2(in, 0) < 0 || dup2(sp->out, 1) < 0 || dup2(sp->err, 2) < 0)
			child_fail(errw, "dup2", CE_SETUP, errno);
	}
	struct rlimit rl = { A.nofile_soft, A.nofile_hard };
	if (rl.rlim_max)
		setrlimit(RLIMIT_NOFILE, &rl);
	umask(022);
	const struct sm_user *u = sp->user;
	if (geteuid() == 0) {
		if (setgroups((size_t)u->ngroups, u->groups) < 0 || setgid(u->gid) < 0 || setuid(u->uid) < 0)
			child_fail(errw, "switching user", CE_USER, errno);
	} else if (u->uid != geteuid() || u->gid != getegid()) {
		if (setgid(u->gid) < 0 || setuid(u->uid) < 0)
			child_fail(errw, "switching user", CE_USER, errno);
	}
	if (chdir(sp->cwd) < 0)
		child_fail(errw, sp->cwd, CE_CWD, errno);
	int e = path_exec(sp->argv, sp->env);
	child_fail(errw, sp->argv[0], CE_EXEC, e);
}

pid_t sm_spawn(const struct sm_spawn *sp)
{
	pid_t pid = fork();
	if (pid < 0)
		return -errno;
	if (pid == 0)
		child(sp);
	sm_remember_pgid(pid);
	return pid;
}

static void close_keeps(struct sm_stream *s)
{
	closefd(&s->in_r_keep);
	closefd(&s->out_w_keep);
	closefd(&s->err_w_keep);
	closefd(&s->pts_keep);
}

/* Fork step s->step; errw is the exec-error pipe (first step) or -1. Returns the pid or -errno. */
static pid_t fork_step(struct sm_stream *s, int errw)
{
	struct sm_spawn sp = {
		.argv = s->steps[s->step],
		.env = s->env,
		.cwd = s->cwd,
		.user = &s->user,
		.in = s->in_r_keep,
		.out = s->out_w_keep,
		.err = s->err_w_keep,
		.tty = s->tty ? s->pts_keep : -1,
		.errw = errw,
		.cgroup_procs = -1,
	};
	if (!s->cgroup) {
		int e = sm_cgroup_new(&s->cgroup);
		if (e < 0)
			return e;
	}
	sp.cgroup_procs = sm_cgroup_procs(s->cgroup);
	pid_t pid = sm_spawn(&sp);
	if (sp.cgroup_procs >= 0)
		close(sp.cgroup_procs);
	if (pid < 0)
		return pid;
	s->pid = pid;
	s->pgid = pid;
	if (s->step + 1 == s->nsteps)
		close_keeps(s);
	return pid;
}

static void start_failed(struct sm_stream *s, int kind, int err)
{
	const char *argv0 = s->steps[0][0];
	switch (kind) {
	case CE_EXEC:
		sm_send_error(s->id, err == ENOENT ? SM_E_NOT_FOUND : SM_E_START_FAILED, err, "%s: %s", argv0,
			      strerror(err));
		break;
	case CE_CWD:
		sm_send_error(s->id, SM_E_START_FAILED, err, "working directory %s: %s", s->cwd, strerror(err));
		break;
	case CE_USER:
		sm_send_error(s->id, SM_E_START_FAILED, err, "switching to uid %u gid %u: %s", (unsigned)s->user.uid,
			      (unsigned)s->user.gid, strerror(err));
		break;
	default:
		sm_send_error(s->id, SM_E_START_FAILED, err, "setting up the process: %s", strerror(err));
		break;
	}
	sm_stream_close(s, 1);
}

static void start_first(struct sm_stream *s)
{
	int p[2], errp[2] = { -1, -1 };
	s->stage_i = s->nstages;
	if (s->tty) {
		s->ptm = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		char name[64];
		if (s->ptm < 0 || unlockpt(s->ptm) < 0 || ptsname_r(s->ptm, name, sizeof name) != 0)
			goto sys_fail;
		s->pts_keep = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (s->pts_keep < 0)
			goto sys_fail;
		struct winsize ws = { .ws_row = s->rows, .ws_col = s->cols };
		ioctl(s->ptm, TIOCSWINSZ, &ws);
		set_nonblock(s->ptm);
	} else {
		if (pipe2(p, O_CLOEXEC) < 0)
			goto sys_fail;
		s->out_r = p[0];
		s->out_w_keep = p[1];
		if (pipe2(p, O_CLOEXEC) < 0)
			goto sys_fail;
		s->err_r = p[0];
		s->err_w_keep = p[1];
		set_nonblock(s->out_r);
		set_nonblock(s->err_r);
		fcntl(s->out_r, F_SETPIPE_SZ, SM_CHUNK); /* fewer, larger reads; best effort */
		if (s->stdin_on) {
			if (pipe2(p, O_CLOEXEC) < 0)
				goto sys_fail;
			s->in_r_keep = p[0];
			s->in_w = p[1];
			set_nonblock(s->in_w);
			fcntl(s->in_w, F_SETPIPE_SZ, SM_CHUNK);
		}
	}
	if (pipe2(errp, O_CLOEXEC) < 0)
		goto sys_fail;
	s->step = 0;
	s->start_ns = sm_now_ns();
	pid_t pid = fork_step(s, errp[1]);
	close(errp[1]);
	if (pid < 0) {
		close(errp[0]);
		errno = -pid;
		goto sys_fail;
	}
	s->errfd = errp[0];
	set_nonblock(s->errfd);
	s->first_pid = pid;
	s->state = X_STARTING;
	return;
sys_fail:
	start_failed(s, CE_SETUP, errno);
}

static void stdin_pump(struct sm_stream *s);
static void try_finish(struct sm_stream *s);

/* Returns 1 when the first step is running (STARTED sent), 0 if not known yet, -1 if it failed
 * (ERROR sent, stream closed). */
static int check_started(struct sm_stream *s, int reaped)
{
	int32_t rep[2];
	ssize_t r = read(s->errfd, rep, sizeof rep);
	if (r < 0 && (errno == EAGAIN || errno == EINTR) && !reaped)
		return 0;
	closefd(&s->errfd);
	if (r == (ssize_t)sizeof rep) {
		start_failed(s, rep[0], rep[1]);
		return -1;
	}
	s->state = X_RUNNING;
	struct sm_buf *b = sm_scratch();
	sm_put_u32(b, 1, (uint32_t)s->first_pid);
	sm_send_buf(b, s->id, SM_STARTED, 0);
	stdin_pump(s);
	return 1;
}

static void begin_drain(struct sm_stream *s)
{
	s->state = X_DRAINING;
	s->pid = 0;
	s->end_ns = sm_now_ns();
	close_keeps(s);
	/* stdin is of no use any more */
	closefd(&s->in_w);
	s->inq_len = 0;
	if (s->tty) {
		s->drain_ns = s->end_ns + TTY_DRAIN_NS;
	} else {
		int k = 0;
		s->counted = 1;
		if (!s->out_done && ioctl(s->out_r, FIONREAD, &k) == 0)
			s->rem_out = (uint64_t)k;
		if (s->rem_out == 0)
			s->out_done = 1;
		k = 0;
		if (!s->err_done && ioctl(s->err_r, FIONREAD, &k) == 0)
			s->rem_err = (uint64_t)k;
		if (s->rem_err == 0)
			s->err_done = 1;
	}
	try_finish(s);
}

void sm_exec_reaped(struct sm_stream *s, int status, const struct rusage *ru)
{
	if ((uint64_t)ru->ru_maxrss > s->peak_rss)
		s->peak_rss = (uint64_t)ru->ru_maxrss;
	if (s->state == X_STARTING && check_started(s, 1) < 0)
		return;
	s->status = status;
	s->pid = 0;
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0 && s->step + 1 < s->nsteps && !s->timed_out) {
		s->step++;
		pid_t pid = fork_step(s, -1);
		if (pid > 0)
			return;
		char msg[128];
		int n = snprintf(msg, sizeof msg, "sm-init: %s: %s\n", s->steps[s->step][0], strerror(-pid));
		if (n > 0 && (uint64_t)n + SM_FRAME_COST <= s->out_credit) { /* like a shell's message, within the credit */
			sm_send(s->id, s->tty ? SM_STDOUT : SM_STDERR, 0, msg, (size_t)n);
			s->out_credit -= (uint64_t)n + SM_FRAME_COST;
		}
		s->status = 126 << 8;
	}
	begin_drain(s);
}

static void try_finish(struct sm_stream *s)
{
	if (s->state != X_DRAINING || !s->out_done || (!s->tty && !s->err_done))
		return;
	sm_send(s->id, SM_STDOUT, SM_FLAG_FIN, NULL, 0);
	if (!s->tty)
		sm_send(s->id, SM_STDERR, SM_FLAG_FIN, NULL, 0);
	struct sm_buf *b = sm_scratch();
	if (WIFEXITED(s->status))
		sm_put_i32(b, 1, WEXITSTATUS(s->status));
	else if (WIFSIGNALED(s->status))
		sm_put_u32(b, 2, (uint32_t)WTERMSIG(s->status));
	if (s->timed_out)
		sm_put_u8(b, 3, 1);
	sm_put_u64(b, 4, (uint64_t)(s->end_ns - s->start_ns) / 1000u);
	sm_put_u64(b, 5, s->peak_rss);
	sm_put_u32(b, 6, s->step);
	sm_send_buf(b, s->id, SM_EXIT, 0);
	if (s->kill_ns) {
		sm_add_pending_kill(s->pgid, s->cgroup, s->kill_ns);
		s->cgroup = 0;
	}
	sm_stream_close(s, 0);
}

/* ------------------------------------------------------------------------------------------------
 * Stdio.
 */

static void grant_stdin(struct sm_stream *s, size_t n)
{
	if (!n)
		return;
	s->in_unacked -= n;
	sm_send_window(s->id, (uint32_t)n);
}

static void stdin_pump(struct sm_stream *s)
{
	int fd = s->tty ? s->ptm : s->in_w;
	if (s->state != X_RUNNING || fd < 0)
		return;
	while (s->inq_len > 0) {
		ssize_t w = write(fd, s->inq + s->inq_off, s->inq_len);
		if (w > 0) {
			s->inq_off += (size_t)w;
			s->inq_len -= (size_t)w;
			grant_stdin(s, (size_t)w);
			continue;
		}
		if (w < 0 && (errno == EAGAIN || errno == EINTR))
			break;
		/* The process closed its stdin (EPIPE) or the pty is gone: discard, keep granting. */
		s->in_closed = 1;
		grant_stdin(s, s->inq_len);
		s->inq_len = 0;
		if (!s->tty)
			closefd(&s->in_w);
	}
	if (s->inq_len == 0)
		s->inq_off = 0;
	if (s->inq_len == 0 && s->in_fin) {
		if (!s->tty) {
			closefd(&s->in_w);
		} else if (!s->eof_sent && !s->in_closed) {
			/* end of input on a terminal: the EOF character, as if typed */
			struct termios t;
			char c = 4;
			if (tcgetattr(s->ptm, &t) == 0 && (t.c_lflag & ICANON) && t.c_cc[VEOF])
				c = (char)t.c_cc[VEOF];
			if (write(s->ptm, &c, 1) == 1)
				s->eof_sent = 1;
		}
	}
}

static void on_stdin(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p)
{
	if (!s->stdin_on) {
		sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "STDIN on an exec without stdin");
		sm_stream_close(s, 1);
		return;
	}
	if (s->in_fin) {
		sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "STDIN after its FIN");
		sm_stream_close(s, 1);
		return;
	}
	if (s->in_unacked + h->length > SM_STDIN_WINDOW) {
		sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "STDIN beyond the window granted (%u bytes unacknowledged)",
			      (unsigned)s->in_unacked);
		sm_stream_close(s, 1);
		return;
	}
	s->in_unacked += h->length;
	if (h->flags & SM_FLAG_FIN)
		s->in_fin = 1;
	if (s->in_closed || s->state == X_DRAINING) {
		grant_stdin(s, h->length);
		return;
	}
	if (h->length) {
		if (s->inq_off + s->inq_len + h->length > s->inq_cap) {
			if (s->inq_off) {
				memmove(s->inq, s->inq + s->inq_off, s->inq_len);
				s->inq_off = 0;
			}
			if (s->inq_len + h->length > s->inq_cap) {
				size_t cap = s->inq_cap ? s->inq_cap : 4096;
				while (cap < s->inq_len + h->length)
					cap *= 2;
				uint8_t *q = realloc(s->inq, cap);
				if (!q) {
					sm_send_error(s->id, SM_E_START_FAILED, ENOMEM, "out of memory buffering stdin");
					sm_stream_close(s, 1);
					return;
				}
				s->inq = q;
				s->inq_cap = cap;
			}
		}
		memcpy(s->inq + s->inq_off + s->inq_len, p, h->length);
		s->inq_len += h->length;
	}
	stdin_pump(s);
}

static void output_done(struct sm_stream *s, int role)
{
	if (role == 0) {
		s->out_done = 1;
		if (!s->tty)
			closefd(&s->out_r);
	} else {
		s->err_done = 1;
		closefd(&s->err_r);
	}
	try_finish(s);
}

static void pump_output(struct sm_stream *s, int role)
{
	int fd = role == 0 ? (s->tty ? s->ptm : s->out_r) : s->err_r;
	uint64_t room = s->out_credit > SM_FRAME_COST ? s->out_credit - SM_FRAME_COST : 0;
	uint64_t max = room < SM_CHUNK ? room : SM_CHUNK;
	uint64_t *rem = role == 0 ? &s->rem_out : &s->rem_err;
	if (s->counted && *rem < max)
		max = *rem;
	if (max == 0 || fd < 0)
		return;
	uint8_t *buf = sm_frame_alloc((size_t)max);
	if (!buf)
		return;
	uint8_t type = (role == 0 || s->tty) ? SM_STDOUT : SM_STDERR;
	/* A pipe's bytes go to the channel by splice (a terminal's are read) */
	ssize_t r = s->tty ? -2 : sm_frame_splice(buf, s->id, type, fd, (size_t)max);
	if (r == -2) {
		r = read(fd, buf, max);
		if (r > 0)
			sm_frame_commit(buf, s->id, type, 0, (size_t)r);
	}
	if (r <= 0)
		sm_frame_cancel(buf);
	if (r > 0) {
		s->out_credit -= (uint64_t)r + SM_FRAME_COST;
		if (s->counted) {
			*rem -= (uint64_t)r;
			if (*rem == 0)
				output_done(s, role);
		}
		return;
	}
	if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
		if (s->counted)
			output_done(s, role);
		return;
	}
	/* EOF, or EIO on a pty master once every slave is closed */
	output_done(s, role);
}

void sm_exec_poll(struct sm_stream *s, int fd[4], short ev[4])
{
	for (int i = 0; i < 4; i++) {
		fd[i] = -1;
		ev[i] = 0;
	}
	if (s->state == X_STARTING) {
		fd[3] = s->errfd;
		ev[3] = POLLIN;
		return;
	}
	if (s->state != X_RUNNING && s->state != X_DRAINING)
		return;
	int produce = s->out_credit > SM_FRAME_COST && !sm_output_blocked();
	if (produce && !s->out_done && (!s->counted || s->rem_out > 0)) {
		fd[0] = s->tty ? s->ptm : s->out_r;
		ev[0] = POLLIN;
	}
	if (produce && !s->tty && !s->err_done && (!s->counted || s->rem_err > 0)) {
		fd[1] = s->err_r;
		ev[1] = POLLIN;
	}
	if (s->inq_len > 0) {
		fd[2] = s->tty ? s->ptm : s->in_w;
		ev[2] = POLLOUT;
	}
}

void sm_exec_fd_event(struct sm_stream *s, int role, short revents)
{
	(void)revents;
	switch (role) {
	case 0:
	case 1:
		pump_output(s, role);
		break;
	case 2:
		stdin_pump(s);
		break;
	case 3:
		if (s->state == X_STARTING)
			check_started(s, 0);
		break;
	default:
		break;
	}
}

/* ------------------------------------------------------------------------------------------------
 * Timers.
 */

int64_t sm_exec_next_timer(struct sm_stream *s)
{
	int64_t t = -1;
	if (s->deadline_ns && !s->timed_out && s->state != X_DRAINING)
		t = s->deadline_ns;
	if (s->kill_ns && (t < 0 || s->kill_ns < t))
		t = s->kill_ns;
	if (s->state == X_DRAINING && s->tty && !s->counted && (t < 0 || s->drain_ns < t))
		t = s->drain_ns;
	return t;
}

void sm_exec_timers(struct sm_stream *s, int64_t now)
{
	if (s->deadline_ns && !s->timed_out && s->state != X_DRAINING && now >= s->deadline_ns) {
		if (s->state == X_STAGING) {
			sm_send_error(s->id, SM_E_START_FAILED, ETIMEDOUT, "timed out after %u ms while staging files",
				      s->timeout_ms);
			sm_stream_close(s, 1);
			return;
		}
		sm_dbg("stream %u: timeout after %u ms; SIGTERM to group %d", s->id, s->timeout_ms, (int)s->pgid);
		s->timed_out = 1;
		signal_step(s, SIGTERM);
		s->kill_ns = now + (int64_t)s->grace_ms * 1000000;
		if (!s->kill_ns)
			s->kill_ns = 1;
	}
	if (s->kill_ns && now >= s->kill_ns) {
		signal_step(s, SIGKILL);
		s->kill_ns = 0;
	}
	if (s->state == X_DRAINING && s->tty && !s->counted && now >= s->drain_ns) {
		/* Something still holds the terminal open: send what is buffered now, then finish. */
		int k = 0;
		s->counted = 1;
		if (!s->out_done && ioctl(s->ptm, FIONREAD, &k) == 0)
			s->rem_out = (uint64_t)k;
		if (s->rem_out == 0) {
			s->out_done = 1;
			try_finish(s);
		}
	}
}

/* ------------------------------------------------------------------------------------------------
 * Frames from the host.
 */

static struct sm_field ff[16];

void sm_exec_frame(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p)
{
	char err[256];
	switch (h->type) {
	case SM_STAGE_DATA:
		if (s->state != X_STAGING || !s->stage_open) {
			sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "STAGE_DATA after the staged files were complete");
			sm_stream_close(s, 1);
			return;
		}
		stage_data(s, h, p);
		return;
	case SM_STDIN:
		on_stdin(s, h, p);
		return;
	case SM_WINDOW:
		if (h->length != 4) {
			sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "WINDOW of %u bytes", h->length);
			sm_stream_close(s, 1);
			return;
		}
		s->out_credit += sm_be32(p);
		return;
	case SM_RESIZE: {
		static const struct sm_spec spec[] = { { 1, SM_K_U16, SM_REQ }, { 2, SM_K_U16, SM_REQ } };
		int k = sm_fields_split(p, h->length, ff, 16);
		if (k < 0 || sm_fields_check(ff, k, spec, 2, err, sizeof err)) {
			sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "RESIZE: %s", k < 0 ? "malformed fields" : err);
			sm_stream_close(s, 1);
			return;
		}
		s->rows = (uint16_t)sm_get_u(ff, k, 1, 24);
		s->cols = (uint16_t)sm_get_u(ff, k, 2, 80);
		if (s->tty && s->ptm >= 0) {
			struct winsize ws = { .ws_row = s->rows, .ws_col = s->cols };
			ioctl(s->ptm, TIOCSWINSZ, &ws);
		}
		return;
	}
	case SM_SIGNAL: {
		static const struct sm_spec spec[] = { { 1, SM_K_U32, SM_REQ } };
		int k = sm_fields_split(p, h->length, ff, 16);
		if (k < 0 || sm_fields_check(ff, k, spec, 1, err, sizeof err)) {
			sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "SIGNAL: %s", k < 0 ? "malformed fields" : err);
			sm_stream_close(s, 1);
			return;
		}
		uint64_t sig = sm_get_u(ff, k, 1, 0);
		if (sig < 1 || sig >= _NSIG) {
			sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "SIGNAL: no signal %llu", (unsigned long long)sig);
			sm_stream_close(s, 1);
			return;
		}
		if (s->state == X_STARTING || s->state == X_RUNNING)
			signal_step(s, (int)sig);
		return;
	}
	default:
		sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "%s on an exec stream", sm_type_name(h->type));
		sm_stream_close(s, 1);
		return;
	}
}

void sm_exec_release(struct sm_stream *s, int abandon)
{
	if (abandon) {
		if (s->state == X_STARTING || s->state == X_RUNNING)
			signal_step(s, SIGKILL);
		else
			sm_kill_tree(s->pgid, s->cgroup, SIGKILL);
	}
	sm_cgroup_release(s->cgroup);
	s->cgroup = 0;
	s->pid = 0;
	if (s->stage_open) {
		sm_fw_abort(&s->w);
		s->stage_open = 0;
	}
	closefd(&s->errfd);
	closefd(&s->in_w);
	closefd(&s->out_r);
	closefd(&s->err_r);
	closefd(&s->ptm);
	close_keeps(s);
	free_exec(s);
}
