/* The agent: one single-threaded poll() loop serving the protocol on one channel fd. */
#ifndef SM_AGENT_H
#define SM_AGENT_H

#include <stdint.h>
#include <sys/resource.h>
#include <sys/types.h>

#include "proto.h"

#define SM_AGENT_NAME "sm-init 0.1.0"
#define SM_MAX_STREAMS 1024u
#define SM_DEFAULT_WINDOW 262144u
#define SM_STDIN_WINDOW 262144u
#define SM_CHUNK 262144u
/* Stop producing output (process pipes, file reads) while this much is queued toward the host. */
#define SM_OUTQ_HIGH (1u << 20)
/* Stop reading the channel while this much is queued (the host is not reading our answers). */
#define SM_OUTQ_HARD (8u << 20)

struct sm_user {
	uid_t uid;
	gid_t gid;
	int ngroups;
	gid_t groups[64];
	char home[512];
};

/* A file being written: to a temporary file in the target directory, renamed into place. */
struct sm_fwriter {
	int fd;
	char *tmp;
	char *path;
	uint64_t size;
	uint64_t written;
};

struct sm_stage {
	char *path;
	uint32_t mode;
	uint64_t size;
};

enum sm_stream_kind { SK_EXEC = 1, SK_WRITE, SK_READ, SK_FS, SK_WATCH, SK_TCP, SK_WORKLOAD, SK_LOGS };
enum sm_exec_state { X_STAGING = 1, X_STARTING, X_RUNNING, X_DRAINING };

struct sm_stream {
	uint32_t id;
	int kind;
	int dead;
	struct sm_stream *hnext; /* hash chain */
	struct sm_stream *next;  /* list of live streams */
	struct sm_stream *prev;
	struct sm_stream *gnext; /* graveyard */
	void *priv;              /* state of the kinds added in protocol version 2 (fs, watch, tcp, logs) */

	/* ---- SK_WRITE ---- */
	struct sm_fwriter w;

	/* ---- SK_READ ---- */
	int rfd;
	uint64_t rsize, rsent, rcredit;

	/* ---- SK_EXEC ---- */
	char *arena;
	char ***steps;
	uint32_t nsteps, step;
	char **env;
	char *home_env; /* HOME=... from passwd when env has none */
	char *cwd;
	struct sm_user user;
	int tty;
	uint16_t rows, cols;
	uint32_t timeout_ms, grace_ms;
	int stdin_on;
	uint64_t out_credit;
	struct sm_stage *stages;
	uint32_t nstages, stage_i;
	int stage_open;
	int state;
	pid_t pid, first_pid, pgid; /* pid: current step, 0 once reaped; pgid: its group */
	int errfd;
	/* our ends; ptm is the pty master (tty mode) */
	int in_w, out_r, err_r, ptm;
	/* the child's ends, kept open by the agent until the last step of a chain has started */
	int in_r_keep, out_w_keep, err_w_keep, pts_keep;
	uint8_t *inq;
	size_t inq_off, inq_len, inq_cap;
	uint64_t in_unacked; /* STDIN bytes received and not yet granted back */
	int in_fin, in_closed, eof_sent;
	int out_done, err_done;
	int counted;            /* draining: only rem_* more bytes are read */
	uint64_t rem_out, rem_err;
	int64_t start_ns, end_ns, deadline_ns, kill_ns, drain_ns;
	int timed_out;
	int status;
	uint64_t peak_rss;
	uint32_t cgroup; /* the cgroup of its processes (cgroup.c), 0 for none */
};

/* Global agent state. */
struct sm_agent {
	int host_mode;
	int debug;
	int chan;
	int sigfd;
	int urandom;
	int connected;
	int reading; /* 0 after BAD_FRAME until the host reconnects */
	int in_session;
	uint64_t epoch;
	uint32_t max_stream;
	unsigned nstreams;
	struct sm_stream *streams;
	struct sm_stream *graveyard;
	size_t outq_bytes;
	uint64_t nofile_soft, nofile_hard;
};

extern struct sm_agent A;

/* agent.c */
int sm_agent_run(int chan_fd, int host_mode, int debug);
void sm_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void sm_dbg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int64_t sm_now_ns(void);
void sm_send(uint32_t stream, uint8_t type, uint8_t flags, const void *p, size_t n);
void sm_send_buf(struct sm_buf *b, uint32_t stream, uint8_t type, uint8_t flags);
/* Zero-copy data frames: allocate room for up to payload_max bytes, fill it, then commit (queue)
 * or cancel. */
uint8_t *sm_frame_alloc(size_t payload_max);
void sm_frame_commit(uint8_t *payload, uint32_t stream, uint8_t type, uint8_t flags, size_t n);
void sm_frame_cancel(uint8_t *payload);
/* A data frame whose payload is spliced out of pipe fd (up to max bytes, max <= what
 * sm_frame_alloc was given), like a read of fd would take it, but without copying it through this
 * process: > 0 queued with that many bytes; 0 end of file and -1 with errno (EAGAIN, EINTR) as
 * read(2), the frame not queued; -2 when splicing is not possible now (read fd instead). */
ssize_t sm_frame_splice(uint8_t *payload, uint32_t stream, uint8_t type, int fd, size_t max);
void sm_send_error(uint32_t stream, uint32_t code, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
void sm_send_window(uint32_t stream, uint32_t n);
struct sm_stream *sm_stream_new(uint32_t id, int kind);
/* End a stream: unlink it, release its resources (abandon: SIGKILL its processes, remove partial
 * files). The struct itself is freed at the end of the loop iteration. */
void sm_stream_close(struct sm_stream *s, int abandon);
int sm_output_blocked(void); /* the output queue is above SM_OUTQ_HIGH */
struct sm_buf *sm_scratch(void);
void sm_remember_pgid(pid_t pgid);
/* SIGKILL a tree later (the timeout's grace after its stream has ended); its cgroup is released then. */
void sm_add_pending_kill(pid_t pgid, uint32_t cgroup, int64_t at_ns);

/* exec.c */
void sm_exec_open(uint32_t id, const uint8_t *p, size_t n);
void sm_exec_frame(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p);
void sm_exec_release(struct sm_stream *s, int abandon);
void sm_exec_reaped(struct sm_stream *s, int status, const struct rusage *ru);
void sm_exec_fd_event(struct sm_stream *s, int which, short revents);
void sm_exec_timers(struct sm_stream *s, int64_t now);
int64_t sm_exec_next_timer(struct sm_stream *s);
/* Which of the stream's fds to poll: roles 0 stdout (or pty), 1 stderr, 2 stdin, 3 exec-error pipe. */
void sm_exec_poll(struct sm_stream *s, int fd[4], short ev[4]);
void sm_kill_group(pid_t pgid, int sig);

/* cgroup.c: a cgroup for each process tree the agent starts */
void sm_cgroup_init(void);
/* A new cgroup (*id = 0 without cgroups). Returns 0 or -errno. */
int sm_cgroup_new(uint32_t *id);
/* Its cgroup.procs opened for writing, for sm_spawn (-1 for id 0 or on failure). */
int sm_cgroup_procs(uint32_t id);
void sm_cgroup_kill(uint32_t id);
/* Freeze (1) or thaw (0) every tree the agent started: frozen, no process of theirs runs a user
 * instruction until thawed. Returns 0 (also without cgroups: nothing to freeze) or -errno. */
int sm_cgroup_freeze(int frozen);
/* Remove it now, or once its last process has gone. */
void sm_cgroup_release(uint32_t id);
/* Signal a tree: its process group; for SIGKILL also every process of its cgroup. */
void sm_kill_tree(pid_t pgid, uint32_t cgroup, int sig);

/* file.c */
int sm_fw_open(struct sm_fwriter *w, const char *path, uint32_t mode, uid_t uid, gid_t gid, int mkdirs, char *msg,
	       size_t msglen);
int sm_fw_write(struct sm_fwriter *w, const void *p, size_t n);
int sm_fw_finish(struct sm_fwriter *w);
void sm_fw_abort(struct sm_fwriter *w);
void sm_write_open(uint32_t id, const uint8_t *p, size_t n);
void sm_read_open(uint32_t id, const uint8_t *p, size_t n);
void sm_file_frame(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p);
void sm_read_pump(struct sm_stream *s);
void sm_file_release(struct sm_stream *s, int abandon);
int sm_read_ready(struct sm_stream *s);

/* exec.c: starting a process (exec steps and the workload). */
struct sm_spawn {
	char **argv;
	char **env;
	const char *cwd;
	const struct sm_user *user;
	int in, out, err; /* the child's fds 0, 1, 2; in < 0: /dev/null */
	int tty;          /* a pty slave to become the controlling terminal and fds 0-2, or -1 */
	int errw;         /* exec-error pipe: the child reports {kind, errno} on it, or -1 */
	int cgroup_procs; /* cgroup.procs of the cgroup the child joins, or -1 */
};
/* Error kinds reported by a child through the exec-error pipe. */
enum { CE_EXEC = 1, CE_CWD, CE_USER, CE_SETUP };
/* Fork a child in a new session running sp->argv. Returns its pid, or -errno. */
pid_t sm_spawn(const struct sm_spawn *sp);

/* Every stream kind of version 2 lives in its own file and offers the same hooks (absent = none):
 * open(id, payload) answers the opening message; frame() takes later frames; release() frees it;
 * poll() names up to 4 fds to poll, event() handles their readiness; ready()/pump() produce output
 * that needs no fd. */

/* fs.c: FS (stat, readdir, mkdir, rm, ...) */
void sm_fs_open(uint32_t id, const uint8_t *p, size_t n);
void sm_fs_frame(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p);
void sm_fs_release(struct sm_stream *s, int abandon);
int sm_fs_ready(struct sm_stream *s);
void sm_fs_pump(struct sm_stream *s);

/* watch.c: WATCH (inotify) */
void sm_watch_open(uint32_t id, const uint8_t *p, size_t n);
void sm_watch_frame(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p);
void sm_watch_release(struct sm_stream *s, int abandon);
void sm_watch_poll(struct sm_stream *s, int fd[4], short ev[4]);
void sm_watch_event(struct sm_stream *s, int role, short revents);

/* tcp.c: TCP_CONNECT tunnels */
void sm_tcp_open(uint32_t id, const uint8_t *p, size_t n);
void sm_tcp_frame(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p);
void sm_tcp_release(struct sm_stream *s, int abandon);
void sm_tcp_poll(struct sm_stream *s, int fd[4], short ev[4]);
void sm_tcp_event(struct sm_stream *s, int role, short revents);

/* workload.c: the workload (belongs to the VM, not to a session) and its log streams */
void sm_workload_open(unsigned type, uint32_t id, const uint8_t *p, size_t n);
void sm_workload_frame(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p);
void sm_workload_release(struct sm_stream *s, int abandon);
int sm_logs_ready(struct sm_stream *s);
void sm_logs_pump(struct sm_stream *s);
/* The workload's own fds (start-error pipe, stdout, stderr), polled outside any stream. */
void sm_workload_poll(int fd[3], short ev[3]);
void sm_workload_fd_event(int role, short revents);
/* A child was reaped: returns 1 if it was the workload. */
int sm_workload_reaped(pid_t pid, int status);
/* SIGKILL the workload's process group (SHUTDOWN, host-mode exit). */
void sm_workload_kill(void);

/* agent.c */
struct sm_stream *sm_stream_lookup(uint32_t id);

/* user.c */
int sm_resolve_user(const char *spec, struct sm_user *u, char *msg, size_t msglen);

/* init.c */
int sm_init_main(void);
void sm_poweroff(void) __attribute__((noreturn));
void sm_shutdown_vm(void);
/* runtime.c: docker's runtime files, mounts and limits, after the switch into the image's root */
void sm_runtime_setup(const char *hostname);
/* A session's identity (HELLO): the hostname (also in /etc/hostname and /etc/hosts' 127.0.1.1
 * line) and /etc/machine-id; either may be NULL. Writes only what changed. */
void sm_runtime_identity(const char *hostname, const char *machine_id);
void sm_chan_flush_blocking(int timeout_ms);
void sm_kill_all_streams(void);

#endif
