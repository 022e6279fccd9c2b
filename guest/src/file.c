/* File streams (WRITE_FILE, READ_FILE) and the atomic file writer shared with exec staging. */
#define _GNU_SOURCE
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

/* Ownership changes that fail with EPERM are tolerated in host mode (not root there). */
static int owner_ok(int r) { return r == 0 || (A.host_mode && errno == EPERM); }

/* mkdir -p of every parent of path; directories it creates get uid:gid. */
static int mkdir_parents(const char *path, uid_t uid, gid_t gid)
{
	char buf[4096];
	size_t n = strlen(path);
	if (n >= sizeof buf) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(buf, path, n + 1);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = 0;
		if (mkdir(buf, 0755) == 0) {
			if (lchown(buf, uid, gid) < 0 && !owner_ok(-1))
				return -1;
		} else if (errno != EEXIST) {
			return -1;
		}
		*p = '/';
	}
	return 0;
}

int sm_fw_open(struct sm_fwriter *w, const char *path, uint32_t mode, uid_t uid, gid_t gid, int mkdirs, char *msg,
	       size_t msglen)
{
	w->fd = -1;
	w->tmp = w->path = NULL;
	w->size = w->written = 0;
	const char *slash = strrchr(path, '/');
	const char *base = slash ? slash + 1 : path;
	if (path[0] != '/' || !*base || !strcmp(base, ".") || !strcmp(base, "..")) {
		snprintf(msg, msglen, "%s: not an absolute file path", path);
		return EINVAL;
	}
	if (mkdirs && mkdir_parents(path, uid, gid) < 0) {
		int e = errno;
		snprintf(msg, msglen, "%s: creating parent directories: %s", path, strerror(e));
		return e;
	}
	size_t dl = (size_t)(slash - path);
	size_t tl = dl + sizeof "/.sm-XXXXXX";
	w->tmp = malloc(tl);
	w->path = strdup(path);
	if (!w->tmp || !w->path) {
		free(w->tmp);
		free(w->path);
		w->tmp = w->path = NULL;
		snprintf(msg, msglen, "%s: out of memory", path);
		return ENOMEM;
	}
	memcpy(w->tmp, path, dl);
	memcpy(w->tmp + dl, "/.sm-XXXXXX", sizeof "/.sm-XXXXXX");
	w->fd = mkostemp(w->tmp, O_CLOEXEC);
	int e = 0;
	if (w->fd < 0) {
		e = errno;
		snprintf(msg, msglen, "%s: %s", path, strerror(e));
		free(w->tmp);
		w->tmp = NULL;
		free(w->path);
		w->path = NULL;
		return e;
	}
	/* chown first: it clears set-id bits */
	if (!owner_ok(fchown(w->fd, uid, gid)) || fchmod(w->fd, mode & 07777) < 0) {
		e = errno;
		snprintf(msg, msglen, "%s: setting owner and mode: %s", path, strerror(e));
		sm_fw_abort(w);
		return e;
	}
	return 0;
}

int sm_fw_write(struct sm_fwriter *w, const void *p, size_t n)
{
	const uint8_t *b = p;
	while (n > 0) {
		ssize_t r = write(w->fd, b, n);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		b += r;
		n -= (size_t)r;
		w->written += (uint64_t)r;
	}
	return 0;
}

/* A file that is a mount point (the VM's names, runtime.c) cannot be renamed over (EBUSY): the
 * temp file's content, mode and owner are copied into it in place instead. Not atomic, but never
 * empty on the way: written over the old bytes from the start, then cut to its length. */
static int copy_in_place(const char *tmp, const char *path)
{
	int in = open(tmp, O_RDONLY | O_CLOEXEC);
	int out = in < 0 ? -1 : open(path, O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
	struct stat st;
	int r = out < 0 || fstat(in, &st) < 0 ? -1 : 0;
	for (off_t left = r == 0 ? st.st_size : 0; left > 0;) {
		ssize_t n = sendfile(out, in, NULL, (size_t)left);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			if (n == 0)
				errno = EIO; /* the temp file shrank: only this writer has it */
			r = -1;
			break;
		}
		left -= n;
	}
	if (r == 0 && (ftruncate(out, st.st_size) < 0 || !owner_ok(fchown(out, st.st_uid, st.st_gid)) ||
		       fchmod(out, st.st_mode & 07777) < 0))
		r = -1;
	int e = errno;
	if (out >= 0)
		close(out);
	if (in >= 0)
		close(in);
	errno = e;
	return r;
}

int sm_fw_finish(struct sm_fwriter *w)
{
	int r = close(w->fd);
	w->fd = -1;
	if (r == 0 && rename(w->tmp, w->path) < 0) {
		r = -1;
		if (errno == EBUSY && copy_in_place(w->tmp, w->path) == 0) {
			unlink(w->tmp);
			r = 0;
		}
	}
	if (r < 0) {
		int e = errno;
		sm_fw_abort(w);
		errno = e;
		return -1;
	}
	free(w->tmp);
	free(w->path);
	w->tmp = w->path = NULL;
	return 0;
}

void sm_fw_abort(struct sm_fwriter *w)
{
	if (w->fd >= 0)
		close(w->fd);
	w->fd = -1;
	if (w->tmp)
		unlink(w->tmp);
	free(w->tmp);
	free(w->path);
	w->tmp = w->path = NULL;
}

static struct sm_field wf[SM_MAX_FIELDS];

void sm_write_open(uint32_t id, const uint8_t *p, size_t n)
{
	static const struct sm_spec spec[] = {
		{ 1, SM_K_STRING, SM_REQ },
		{ 2, SM_K_U32, 0 },
		{ 3, SM_K_U32, 0 },
		{ 4, SM_K_U32, 0 },
		{ 5, SM_K_U64, SM_REQ },
		{ 6, SM_K_U8, 0 },
	};
	char err[512];
	int nf = sm_fields_split(p, n, wf, SM_MAX_FIELDS);
	if (nf < 0 || sm_fields_check(wf, nf, spec, 6, err, sizeof err)) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "WRITE_FILE: %s", nf < 0 ? "malformed fields" : err);
		return;
	}
	const struct sm_field *pf = sm_find(wf, nf, 1);
	char path[4096];
	if (pf->len >= sizeof path || pf->len == 0 || pf->val[0] != '/') {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "WRITE_FILE: the path must be absolute (and shorter than 4096 bytes)");
		return;
	}
	memcpy(path, pf->val, pf->len);
	path[pf->len] = 0;
	uint32_t mode = (uint32_t)sm_get_u(wf, nf, 2, 0644);
	if (mode & ~07777u) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "WRITE_FILE: mode 0%o has bits beyond 07777", mode);
		return;
	}
	struct sm_stream *s = sm_stream_new(id, SK_WRITE);
	if (!s) {
		sm_send_error(id, SM_E_IO, ENOMEM, "out of memory");
		return;
	}
	int e = sm_fw_open(&s->w, path, mode, (uid_t)sm_get_u(wf, nf, 3, 0), (gid_t)sm_get_u(wf, nf, 4, 0),
			   (int)sm_get_u(wf, nf, 6, 0), err, sizeof err);
	if (e) {
		sm_send_error(id, SM_E_IO, e, "%s", err);
		sm_stream_close(s, 1);
		return;
	}
	s->w.size = sm_get_u(wf, nf, 5, 0);
}

void sm_read_open(uint32_t id, const uint8_t *p, size_t n)
{
	static const struct sm_spec spec[] = { { 1, SM_K_STRING, SM_REQ }, { 2, SM_K_U32, 0 } };
	char err[256];
	int nf = sm_fields_split(p, n, wf, SM_MAX_FIELDS);
	if (nf < 0 || sm_fields_check(wf, nf, spec, 2, err, sizeof err)) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "READ_FILE: %s", nf < 0 ? "malformed fields" : err);
		return;
	}
	const struct sm_field *pf = sm_find(wf, nf, 1);
	char path[4096];
	if (pf->len >= sizeof path || pf->len == 0) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "READ_FILE: empty or too long path");
		return;
	}
	memcpy(path, pf->val, pf->len);
	path[pf->len] = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0) {
		int e = errno;
		if (fd >= 0)
			close(fd);
		sm_send_error(id, e == ENOENT || e == ENOTDIR ? SM_E_NOT_FOUND : SM_E_IO, e, "%s: %s", path, strerror(e));
		return;
	}
	if (!S_ISREG(st.st_mode)) {
		close(fd);
		int e = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
		sm_send_error(id, SM_E_IO, e, "%s: not a regular file", path);
		return;
	}
	struct sm_stream *s = sm_stream_new(id, SK_READ);
	if (!s) {
		close(fd);
		sm_send_error(id, SM_E_IO, ENOMEM, "out of memory");
		return;
	}
	s->rfd = fd;
	s->rsize = (uint64_t)st.st_size;
	s->rcredit = sm_get_u(wf, nf, 2, SM_DEFAULT_WINDOW);
	struct sm_buf *b = sm_scratch();
	sm_put_u64(b, 1, s->rsize);
	sm_put_u32(b, 2, st.st_mode);
	sm_put_u32(b, 3, st.st_uid);
	sm_put_u32(b, 4, st.st_gid);
	sm_send_buf(b, id, SM_FILE_INFO, 0);
	sm_read_pump(s);
}

int sm_read_ready(struct sm_stream *s)
{
	return !s->dead && (s->rsent == s->rsize || s->rcredit > SM_FRAME_COST) && !sm_output_blocked();
}

void sm_read_pump(struct sm_stream *s)
{
	while (sm_read_ready(s)) {
		uint64_t left = s->rsize - s->rsent;
		if (left == 0) {
			sm_send(s->id, SM_FILE_DATA, SM_FLAG_FIN, NULL, 0);
			sm_stream_close(s, 0);
			return;
		}
		size_t want = SM_CHUNK;
		if (want > left)
			want = (size_t)left;
		if (want > s->rcredit - SM_FRAME_COST)
			want = (size_t)(s->rcredit - SM_FRAME_COST);
		uint8_t *buf = sm_frame_alloc(want);
		if (!buf)
			return;
		ssize_t r = pread(s->rfd, buf, want, (off_t)s->rsent);
		if (r <= 0)
			sm_frame_cancel(buf);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			int e = r < 0 ? errno : EIO;
			sm_send_error(s->id, SM_E_IO, e, "reading: %s", r < 0 ? strerror(e) : "the file shrank while being read");
			sm_stream_close(s, 1);
			return;
		}
		s->rsent += (uint64_t)r;
		s->rcredit -= (uint64_t)r + SM_FRAME_COST;
		int last = s->rsent == s->rsize;
		sm_frame_commit(buf, s->id, SM_FILE_DATA, last ? SM_FLAG_FIN : 0, (size_t)r);
		if (last) {
			sm_stream_close(s, 0);
			return;
		}
	}
}

void sm_file_frame(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p)
{
	if (s->kind == SK_READ && h->type == SM_WINDOW) {
		if (h->length != 4) {
			sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "WINDOW of %u bytes", h->length);
			sm_stream_close(s, 1);
			return;
		}
		s->rcredit += sm_be32(p);
		return;
	}
	if (s->kind != SK_WRITE || h->type != SM_FILE_DATA) {
		sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "%s on a %s stream", sm_type_name(h->type),
			      s->kind == SK_READ ? "READ_FILE" : "WRITE_FILE");
		sm_stream_close(s, 1);
		return;
	}
	if (s->w.written + h->length > s->w.size) {
		sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "FILE_DATA beyond the announced size of %llu bytes",
			      (unsigned long long)s->w.size);
		sm_stream_close(s, 1);
		return;
	}
	if (sm_fw_write(&s->w, p, h->length)) {
		int e = errno;
		sm_send_error(s->id, SM_E_IO, e, "%s: %s", s->w.path, strerror(e));
		sm_stream_close(s, 1);
		return;
	}
	if (!(h->flags & SM_FLAG_FIN))
		return;
	if (s->w.written != s->w.size) {
		sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "FILE_DATA ended after %llu of %llu bytes",
			      (unsigned long long)s->w.written, (unsigned long long)s->w.size);
		sm_stream_close(s, 1);
		return;
	}
	char path[4096];
	snprintf(path, sizeof path, "%s", s->w.path);
	uint64_t size = s->w.written;
	if (sm_fw_finish(&s->w)) {
		int e = errno;
		sm_send_error(s->id, SM_E_IO, e, "%s: %s", path, strerror(e));
		sm_stream_close(s, 1);
		return;
	}
	struct sm_buf *b = sm_scratch();
	sm_put_u64(b, 1, size);
	sm_send_buf(b, s->id, SM_OK, 0);
	sm_stream_close(s, 0);
}

void sm_file_release(struct sm_stream *s, int abandon)
{
	(void)abandon;
	if (s->kind == SK_WRITE)
		sm_fw_abort(&s->w);
	if (s->rfd >= 0)
		close(s->rfd);
	s->rfd = -1;
}
