/* File-system operations (docs/protocol.md, "File-system operations"): one FS request, answered at
 * once by a result frame (STAT) or none, then OK; or ERROR IO with errno. A directory listing is
 * the exception: a stream of DIRENTS frames within the host's credit, then OK. */
#define _GNU_SOURCE
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum {
	FS_STAT = 1,
	FS_READDIR,
	FS_MKDIR,
	FS_RM,
	FS_RENAME,
	FS_CHMOD,
	FS_CHOWN,
	FS_SYMLINK,
	FS_READLINK,
	FS_REALPATH,
	FS_TRUNCATE,
	FS_UTIMES,
	FS_ACCESS,
};
#define FSF_RECURSIVE 1u
#define FSF_FORCE 2u
#define FSF_NOFOLLOW 4u

#define RM_MAX_DEPTH 4096   /* open directories during a recursive rm (one fd each) */
#define RM_MAX_PASSES 64    /* rescans of a directory that something keeps filling */
#define DIRENT_MAX 272u     /* bytes of one DIRENTS entry at most (nested header, name ≤ 255, type) */
#define DIRENTS_MAX 65536u  /* payload of one DIRENTS frame at most */

static const char *const op_names[] = { "?", "stat", "readdir", "mkdir", "rm", "rename", "chmod", "chown",
					"symlink", "readlink", "realpath", "truncate", "utimes", "access" };

struct fsdir {
	DIR *d;
	uint64_t credit;
	struct dirent pending; /* an entry read that did not fit in the previous frame */
	int has_pending;
};

static struct sm_field ff[32];

static uint64_t ts_ns(const struct timespec *t)
{
	return t->tv_sec < 0 ? 0 : (uint64_t)t->tv_sec * 1000000000u + (uint64_t)t->tv_nsec;
}

static void send_stat(uint32_t id, const struct stat *st)
{
	struct sm_buf *b = sm_scratch();
	sm_put_u32(b, 1, st->st_mode);
	sm_put_u32(b, 2, st->st_uid);
	sm_put_u32(b, 3, st->st_gid);
	sm_put_u64(b, 4, (uint64_t)st->st_size);
	sm_put_u64(b, 5, ts_ns(&st->st_atim));
	sm_put_u64(b, 6, ts_ns(&st->st_mtim));
	sm_put_u64(b, 7, ts_ns(&st->st_ctim));
	sm_put_u64(b, 8, (uint64_t)st->st_ino);
	sm_put_u64(b, 9, (uint64_t)st->st_dev);
	sm_put_u64(b, 10, (uint64_t)st->st_nlink);
	sm_put_u64(b, 11, (uint64_t)st->st_rdev);
	sm_put_u64(b, 12, (uint64_t)st->st_blocks);
	sm_put_u32(b, 13, (uint32_t)st->st_blksize);
	sm_send_buf(b, id, SM_STAT, 0);
}

static void send_ok(uint32_t id, const char *path)
{
	struct sm_buf *b = sm_scratch();
	if (path)
		sm_put_str(b, 2, path);
	sm_send_buf(b, id, SM_OK, 0);
}

/* mkdir -p: returns 0 and the first directory it created in `first` ("" if none), or -1. */
static int mkdir_recursive(const char *path, mode_t mode, char *first, size_t cap)
{
	char buf[PATH_MAX];
	size_t n = strlen(path);
	first[0] = 0;
	if (n >= sizeof buf) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(buf, path, n + 1);
	while (n > 1 && buf[n - 1] == '/')
		buf[--n] = 0;
	for (char *p = buf + 1;; p++) {
		int last = *p == 0;
		if (*p != '/' && !last)
			continue;
		*p = 0;
		if (mkdir(buf, mode) == 0) {
			if (!first[0])
				snprintf(first, cap, "%s", buf);
		} else {
			struct stat st;
			if (errno != EEXIST)
				return -1;
			if (stat(buf, &st) < 0)
				return -1;
			if (!S_ISDIR(st.st_mode)) {
				errno = last ? EEXIST : ENOTDIR;
				return -1;
			}
		}
		if (last)
			return 0;
		*p = '/';
	}
}

/* Remove `name` under `dirfd`, never following a symlink: directories are opened O_NOFOLLOW and
 * emptied through their fd (unlinkat), so a symlink swapped in meanwhile is unlinked, not entered. */
static int rm_at(int dirfd, const char *name, int recursive, int depth)
{
	struct stat st;
	if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
		return -1;
	if (!S_ISDIR(st.st_mode))
		return unlinkat(dirfd, name, 0);
	if (!recursive) {
		errno = EISDIR;
		return -1;
	}
	if (depth >= RM_MAX_DEPTH) {
		errno = ENAMETOOLONG;
		return -1;
	}
	int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return -1;
	DIR *d = fdopendir(fd);
	if (!d) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	for (int pass = 0;; pass++) {
		int removed = 0;
		struct dirent *e;
		rewinddir(d);
		while ((e = readdir(d))) {
			if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
				continue;
			if (rm_at(fd, e->d_name, 1, depth + 1) < 0 && errno != ENOENT) {
				int err = errno;
				closedir(d);
				errno = err;
				return -1;
			}
			removed = 1;
		}
		if (!removed)
			break;
		if (pass == RM_MAX_PASSES) {
			closedir(d);
			errno = ENOTEMPTY;
			return -1;
		}
	}
	closedir(d);
	return unlinkat(dirfd, name, AT_REMOVEDIR);
}

static int copy_field(const struct sm_field *f, char *out, size_t cap)
{
	if (!f || f->len == 0 || f->len >= cap)
		return -1;
	memcpy(out, f->val, f->len);
	out[f->len] = 0;
	return 0;
}

void sm_fs_open(uint32_t id, const uint8_t *p, size_t n)
{
	static const struct sm_spec spec[] = {
		{ 1, SM_K_U8, SM_REQ },	 { 2, SM_K_STRING, SM_REQ }, { 3, SM_K_STRING, 0 }, { 4, SM_K_U32, 0 },
		{ 5, SM_K_U32, 0 },	 { 6, SM_K_U32, 0 },	     { 7, SM_K_U32, 0 },    { 8, SM_K_U64, 0 },
		{ 9, SM_K_U64, 0 },	 { 10, SM_K_U64, 0 },	     { 11, SM_K_U32, 0 },
	};
	char err[256];
	static char path[PATH_MAX], path2[PATH_MAX], out[PATH_MAX];
	int nf = sm_fields_split(p, n, ff, 32);
	if (nf < 0 || sm_fields_check(ff, nf, spec, sizeof spec / sizeof spec[0], err, sizeof err)) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "FS: %s", nf < 0 ? "malformed fields" : err);
		return;
	}
	unsigned op = (unsigned)sm_get_u(ff, nf, 1, 0);
	if (op < FS_STAT || op > FS_ACCESS) {
		sm_send_error(id, SM_E_UNSUPPORTED, 0, "FS: unknown operation %u", op);
		return;
	}
	const char *name = op_names[op];
	if (copy_field(sm_find(ff, nf, 2), path, sizeof path)) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "FS %s: empty path or longer than %d bytes", name, PATH_MAX - 1);
		return;
	}
	const struct sm_field *p2 = sm_find(ff, nf, 3), *mode_f = sm_find(ff, nf, 4);
	if ((op == FS_RENAME || op == FS_SYMLINK) && copy_field(p2, path2, sizeof path2)) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "FS %s: needs path2 (1 to %d bytes)", name, PATH_MAX - 1);
		return;
	}
	if ((op == FS_CHMOD && !mode_f) || (op == FS_CHOWN && (!sm_find(ff, nf, 6) || !sm_find(ff, nf, 7)))) {
		sm_send_error(id, SM_E_BAD_REQUEST, 0, "FS %s: needs %s", name, op == FS_CHMOD ? "mode" : "uid and gid");
		return;
	}
	uint32_t flags = (uint32_t)sm_get_u(ff, nf, 5, 0);
	int nofollow = (flags & FSF_NOFOLLOW) != 0;
	int r = 0;
	struct stat st;
	switch (op) {
	case FS_STAT:
		r = nofollow ? lstat(path, &st) : stat(path, &st);
		if (r == 0) {
			send_stat(id, &st);
			send_ok(id, NULL);
		}
		break;
	case FS_READDIR: {
		struct fsdir *fd = calloc(1, sizeof *fd);
		if (!fd) {
			errno = ENOMEM;
			r = -1;
			break;
		}
		fd->d = opendir(path);
		if (!fd->d) {
			int e = errno;
			free(fd);
			errno = e;
			r = -1;
			break;
		}
		struct sm_stream *s = sm_stream_new(id, SK_FS);
		if (!s) {
			closedir(fd->d);
			free(fd);
			errno = ENOMEM;
			r = -1;
			break;
		}
		s->priv = fd;
		fd->credit = sm_get_u(ff, nf, 11, SM_DEFAULT_WINDOW);
		sm_fs_pump(s);
		return;
	}
	case FS_MKDIR: {
		mode_t mode = (mode_t)sm_get_u(ff, nf, 4, 0777) & 07777;
		if (flags & FSF_RECURSIVE) {
			r = mkdir_recursive(path, mode, out, sizeof out);
			if (r == 0)
				send_ok(id, out[0] ? out : NULL);
		} else {
			r = mkdir(path, mode);
			if (r == 0)
				send_ok(id, NULL);
		}
		break;
	}
	case FS_RM:
		r = rm_at(AT_FDCWD, path, (flags & FSF_RECURSIVE) != 0, 0);
		if (r < 0 && errno == ENOENT && (flags & FSF_FORCE))
			r = 0;
		if (r == 0)
			send_ok(id, NULL);
		break;
	case FS_RENAME:
		if ((r = rename(path, path2)) == 0)
			send_ok(id, NULL);
		break;
	case FS_CHMOD:
		if ((r = chmod(path, (mode_t)sm_uval(mode_f) & 07777)) == 0)
			send_ok(id, NULL);
		break;
	case FS_CHOWN: {
		uid_t uid = (uid_t)sm_get_u(ff, nf, 6, 0);
		gid_t gid = (gid_t)sm_get_u(ff, nf, 7, 0);
		r = nofollow ? lchown(path, uid, gid) : chown(path, uid, gid);
		if (r == 0)
			send_ok(id, NULL);
		break;
	}
	case FS_SYMLINK:
		if ((r = symlink(path2, path)) == 0)
			send_ok(id, NULL);
		break;
	case FS_READLINK: {
		ssize_t k = readlink(path, out, sizeof out - 1);
		r = k < 0 ? -1 : 0;
		if (k >= 0) {
			out[k] = 0;
			struct sm_buf *b = sm_scratch();
			sm_put_bytes(b, 2, out, (size_t)k);
			sm_send_buf(b, id, SM_OK, 0);
		}
		break;
	}
	case FS_REALPATH:
		if (realpath(path, out))
			send_ok(id, out);
		else
			r = -1;
		break;
	case FS_TRUNCATE: {
		uint64_t size = sm_get_u(ff, nf, 8, 0);
		if (size > (uint64_t)INT64_MAX) {
			errno = EINVAL;
			r = -1;
		} else if ((r = truncate(path, (off_t)size)) == 0) {
			send_ok(id, NULL);
		}
		break;
	}
	case FS_UTIMES: {
		struct timespec ts[2] = { { 0, UTIME_OMIT }, { 0, UTIME_OMIT } };
		for (int i = 0; i < 2; i++) {
			const struct sm_field *t = sm_find(ff, nf, (uint8_t)(9 + i));
			if (t) {
				uint64_t ns = sm_uval(t);
				ts[i].tv_sec = (time_t)(ns / 1000000000u);
				ts[i].tv_nsec = (long)(ns % 1000000000u);
			}
		}
		if ((r = utimensat(AT_FDCWD, path, ts, nofollow ? AT_SYMLINK_NOFOLLOW : 0)) == 0)
			send_ok(id, NULL);
		break;
	}
	case FS_ACCESS:
		if ((r = access(path, (int)(sm_get_u(ff, nf, 4, F_OK) & 7))) == 0)
			send_ok(id, NULL);
		break;
	default:
		break;
	}
	if (r < 0) {
		int e = errno;
		sm_send_error(id, SM_E_IO, e, "%s %s: %s", name, path, strerror(e));
	}
}

/* ------------------------------------------------------------------------------------------------
 * Directory listings.
 */

int sm_fs_ready(struct sm_stream *s)
{
	const struct fsdir *fd = s->priv;
	return !s->dead && fd->credit >= SM_FRAME_COST + DIRENT_MAX && !sm_output_blocked();
}

static uint8_t entry_type(DIR *d, const struct dirent *e)
{
	if (e->d_type != DT_UNKNOWN)
		return e->d_type;
	struct stat st;
	if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
		return DT_UNKNOWN;
	return (uint8_t)((st.st_mode & S_IFMT) >> 12);
}

void sm_fs_pump(struct sm_stream *s)
{
	struct fsdir *fd = s->priv;
	while (sm_fs_ready(s)) {
		uint64_t room = fd->credit - SM_FRAME_COST;
		if (room > DIRENTS_MAX)
			room = DIRENTS_MAX;
		struct sm_buf *b = sm_scratch();
		int end = 0, count = 0;
		for (;;) {
			struct dirent *e;
			if (fd->has_pending) {
				e = &fd->pending;
				fd->has_pending = 0;
			} else {
				errno = 0;
				e = readdir(fd->d);
				if (!e) {
					if (errno) {
						int err = errno;
						sm_send_error(s->id, SM_E_IO, err, "readdir: %s", strerror(err));
						sm_stream_close(s, 1);
						return;
					}
					end = 1;
					break;
				}
				if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
					continue;
			}
			size_t nl = strlen(e->d_name);
			if (b->len - SM_HDR_SIZE + 16 + nl > room) {
				if (e != &fd->pending)
					memcpy(&fd->pending, e, sizeof fd->pending);
				fd->has_pending = 1;
				break;
			}
			size_t m = sm_nested_begin(b, 1);
			sm_put_bytes(b, 1, e->d_name, nl);
			sm_put_u8(b, 2, entry_type(fd->d, e));
			sm_nested_end(b, m);
			count++;
		}
		if (count) {
			uint64_t len = b->len - SM_HDR_SIZE;
			sm_send_buf(b, s->id, SM_DIRENTS, 0);
			fd->credit -= len + SM_FRAME_COST;
		}
		if (end) {
			send_ok(s->id, NULL);
			sm_stream_close(s, 0);
			return;
		}
	}
}

void sm_fs_frame(struct sm_stream *s, const struct sm_hdr *h, const uint8_t *p)
{
	if (h->type == SM_WINDOW) {
		((struct fsdir *)s->priv)->credit += sm_be32(p);
		return;
	}
	sm_send_error(s->id, SM_E_BAD_REQUEST, 0, "%s on an FS stream", sm_type_name(h->type));
	sm_stream_close(s, 1);
}

void sm_fs_release(struct sm_stream *s, int abandon)
{
	(void)abandon;
	struct fsdir *fd = s->priv;
	if (!fd)
		return;
	closedir(fd->d);
	free(fd);
	s->priv = NULL;
}
