/* Watches (docs/protocol.md, "Watches"): inotify events under a path, as WATCH_EVENT frames within
 * the host's credit. The inotify fd is always read (so that a recursive watch can add the
 * directories that appear); events beyond the credit are dropped and reported as one overflow
 * event once credit is back. At most WATCH_MAX directories are watched per stream. */
#define _GNU_SOURCE
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#define WATCH_MAX 8192u
#define WATCH_BUCKETS 256u
#define WATCH_READS 8 /* inotify reads per poll event */
#define MASK (IN_CREATE | IN_MODIFY | IN_ATTRIB | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF)

enum { EV_READY = 0, EV_CREATE, EV_MODIFY, EV_DELETE, EV_RENAME, EV_OVERFLOW };

struct wnode {
	struct wnode *next;
	int wd;
	char rel[]; /* path relative to the watched path, "" for the watched path itself */
};

struct watch {
	int fd;
	int recursive;
	int root_wd;
	int overflow;   /* events were dropped: report it when credit allows */
	unsigned count; /* watches held */
	uint64_t credit;
	struct wnode *b[WATCH_BUCKETS];
	char root[PATH_MAX]; /* the watched path */
};

static struct sm_field wf[8];

static struct wnode *find(struct watch *w, int wd)
{
	for (struct wnode *n = w->b[(unsigned)wd % WATCH_BUCKETS]; n; n = n->next)
		if (n->wd == wd)
			return n;
	return NULL;
}

static void forget(struct watch *w, int wd)
{
	struct wnode **pp = &w->b[(unsigned)wd % WATCH_BUCKETS];
	while (*pp && (*pp)->wd != wd)
		pp = &(*pp)->next;
	if (*pp) {
		struct wnode *n = *pp;
		*pp = n->next;
		free(n);
		w->count--;
	}
}

/* Add (or re-path) a watch on `abs`, known to the host as `rel`. Returns the wd or -1. */
static int add(struct watch *w, const char *abs, const char *rel, uint32_t extra)
{
	if (w->count >= WATCH_MAX) {
		w->overflow = 1;
		errno = ENOSPC;
		return -1;
	}
	int wd = inotify_add_watch(w->fd, abs, MASK | extra);
	if (wd < 0) {
		if (errno == ENOSPC)
			w->overflow = 1;
		return -1;
	}
	if (find(w, wd)) /* the same directory under a new name (it was moved): take the new one */
		forget(w, wd);
	size_t l = strlen(rel);
	struct wnode *n = malloc(sizeof *n + l + 1);
	if (!n) {
		inotify_rm_watch(w->fd, wd);
		w->overflow = 1;
		return -1;
	}
	n->wd = wd;
	memcpy(n->rel, rel, l + 1);
	n->next = w->b[(unsigned)wd % WATCH_BUCKETS];
	w->b[(unsigned)wd % WATCH_BUCKETS] = n;
	w->count++;
	return wd;
}

/* Watch every directory below abs (never following symlinks), depth first, within WATCH_MAX. */
static void add_tree(struct watch *w, const char *abs, const char *rel, int depth)
{
	if (depth > 64 || w->count >= WATCH_MAX)
		return;
	DIR *d = opendir(abs);
	if (!d)
		return;
	struct dirent *e;
	while ((e = readdir(d)) && w->count < WATCH_MAX) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		int isdir = e->d_type == DT_DIR;
		if (e->d_type == DT_UNKNOWN) {
			struct stat st;
			isdir = fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode);
		}
		if (!isdir)
			continue;
		char a[PATH_MAX], r[PATH_MAX];
		if (snprintf(a, sizeof a, "%s/%s", abs, e->d_name) >= (int)sizeof a ||
		    snprintf(r, sizeof r, "%s%s%s", rel, *rel ? "/" : "", e->d_name) >= (int)sizeof r)
			continue;
		if (add(w, a, r, IN_DONT_FOLLOW | IN_ONLYDIR) >= 0)
			add_tree(w, a, r, depth + 1);
	}
	closedir(d);
	if (w->count >= WATCH_MAX)
		w->overflow = 1;
}

/* Send one event within the credit; otherwise note the loss. Returns 0 if sent. */
static int emit(struct sm_stream *s, int event, const char *name, size_t nl, int isdir)
{
	struct watch *w = s->priv;
	struct sm_buf *b = sm_scratch();
	sm_put_u8(b, 1, (uint8_t)event);
	if (name)
		sm_put_bytes(b, 2, name, nl);
	if (isdir)
		sm_put_u8(b, 3, 1);
	uint64_t cost = b->len - SM_HDR_SIZE + SM_FRAME_COST;
	if (cost > w->credit || sm_output_blocked()) {
		if (event != EV_OVERFLOW)
			w->overflow = 1;
		return -1;
	}
	sm_send_buf(b, s->id, SM_WATCH_EVENT, 0);
	w->credit -= cost;
	return 0;
}

static void flush_overflow(struct sm_stream *s)
{
	struct watch *w = s->priv;
	if (w->overflow && emit(s, EV_OVERFLOW, NULL, 0, 0) == 0)
		w->overflow = 0;
}

void sm_watch_open(uint32_t id, const uint8_t *p, size_t n)
{
	static const struct sm_spec spec[] = { { 1, SM_K_STRING, SM_REQ }, { 2, SM_K_U8, 0 }, { 3, SM_K_U32, 0 } };
	char err[256], path[PATH_MAX];
	int nf = sm_fields_split(p, n, wf, 8);
	if (nf < 0 || sm_fields_check(wf, nf, spec, 3, err, sizeof err)) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "WATCH: %s", nf < 0 ? "malformed fields" : err);
		return;
	}
	const struct sm_field *pf = sm_find(wf, nf, 1);
	if (pf->len == 0 || pf->len >= sizeof path) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "WATCH: empty or too long path");
		return;
	}
	memcpy(path, pf->val, pf->len);
	path[pf->len] = 0;
	while (pf->len > 1 && path[strlen(path) - 1] == '/')
		path[strlen(path) - 1] = 0;
	struct watch *w = calloc(1, sizeof *w);
	struct sm_stream *s = w ? sm_stream_new(id, SK_WATCH) : NULL;
	if (!s) {
		free(w);
		sm_send_error(id, SM_E_IO, ENOMEM, "out of memory");
		return;
	}
	s->priv = w;
	memcpy(w->root, path, strlen(path) + 1);
	w->recursive = sm_get_u(wf, nf, 2, 0) != 0;
	w->credit = sm_get_u(wf, nf, 3, SM_DEFAULT_WINDOW);
	w->fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	w->root_wd = w->fd < 0 ? -1 : add(w, path, "", 0);
	if (w->root_wd < 0) {
		int e = errno;
		sm_send_error(id, e == ENOENT || e == ENOTDIR ? SM_E_NOT_FOUND : SM_E_IO, e, "watch %s: %s", path,
			      strerror(e));
		sm_stream_close(s, 1);
		return;
	}
	w->overflow = 0;
	struct stat st;
	if (w->recursive && stat(path, &st) == 0 && S_ISDIR(st.st_mode))
		add_tree(w, path, "", 0);
	emit(s, EV_READY, NULL, 0, 0);
	flush_overflow(s);
}

static void on_event(struct sm_stream *s, const struct inotify_event *ev)
{
	struct watch *w = s->priv;
	if (ev->mask & IN_Q_OVERFLOW) {
		w->overflow = 1;
		return;
	}
	struct wnode *n = find(w, ev->wd);
	if (!n)
		return;
	int isdir = (ev->mask & IN_ISDIR) != 0;
	if (ev->mask & IN_IGNORED) { /* the watch is gone: its directory was deleted or unmounted */
		int root = ev->wd == w->root_wd;
		forget(w, ev->wd);
		if (root) {
			flush_overflow(s);
			sm_send_buf(sm_scratch(), s->id, SM_OK, 0);
			sm_stream_close(s, 0);
		}
		return;
	}
	char rel[PATH_MAX];
	const char *name = ev->len ? ev->name : "";
	if (snprintf(rel, sizeof rel, "%s%s%s", n->rel, *n->rel && *name ? "/" : "", name) >= (int)sizeof rel)
		return;
	int self = !ev->len;
	if (self && ev->wd != w->root_wd)
		return; /* a subdirectory's own change (attributes, deletion, move): its parent reports it */
	int event = (ev->mask & IN_CREATE) ? EV_CREATE
		: (ev->mask & (IN_MODIFY | IN_ATTRIB)) ? EV_MODIFY
		: (ev->mask & (IN_DELETE | IN_DELETE_SELF)) ? EV_DELETE
		: EV_RENAME;
	flush_overflow(s);
	if (!w->overflow)
		emit(s, event, rel, strlen(rel), isdir);
	if (w->recursive && isdir && !self && (ev->mask & (IN_CREATE | IN_MOVED_TO))) {
		/* Watch the new directory and the directories it already holds (a moved-in tree, or
		 * ones created before the watch was in place). A directory moved within the tree keeps
		 * its watch: add() takes the new name. */
		char abs[PATH_MAX];
		if (snprintf(abs, sizeof abs, "%s/%s", w->root, rel) < (int)sizeof abs &&
		    add(w, abs, rel, IN_DONT_FOLLOW | IN_ONLYDIR) >= 0)
			add_tree(w, abs, rel, 0);
		flush_overflow(s);
	}
}

void sm_watch_poll(struct sm_stream *s, int fd[4], short ev[4])
{
	struct watch *w = s->priv;
	fd[0] = w->fd;
	ev[0] = POLLIN;
}

void sm_watch_event(struct sm_stream *s, int role, short revents)
{
	(void)role;
	(void)revents;
	struct watch *w = s->priv;
	_Alignas(struct inotify_event) char buf[16384];
	for (int i = 0; i < WATCH_READS && !s->dead; i++) {
		ssize_t r = read(w->fd, buf, sizeof buf);
		if (r <= 0)
			return;
		for (char *q = buf; q < buf + r && !s->dead;) {
			const struct inotify_event *ev = (const struct inotify_event *)(void *)q;
			on_event(s, ev);
			q += sizeof *ev + ev->len;
		}
	}
}

void sm_watch_frame(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p)
{
	if (h->type == SM_WINDOW) {
		((struct watch *)s->priv)->credit += sm_be32(p);
		flush_overflow(s);
		return;
	}
	sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "%s on a WATCH stream", sm_type_name(h->type));
	sm_stream_close(s, 1);
}

void sm_watch_release(struct sm_stream *s, int abandon)
{
	(void)abandon;
	struct watch *w = s->priv;
	if (!w)
		return;
	if (w->fd >= 0)
		close(w->fd);
	for (unsigned i = 0; i < WATCH_BUCKETS; i++) {
		for (struct wnode *n = w->b[i], *nx; n; n = nx) {
			nx = n->next;
			free(n);
		}
	}
	free(w);
	s->priv = NULL;
}
