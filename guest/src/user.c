/* User resolution from the guest's /etc/passwd and /etc/group (no NSS): `name`, `uid`,
 * `name:group`, `uid:gid`, and mixtures. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_DB (8u << 20)

/* Read a whole file (bounded). Returns a NUL-terminated buffer or NULL (missing file = empty). */
static char *slurp(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	size_t cap = 4096, len = 0;
	char *buf = malloc(cap + 1);
	if (!buf) {
		if (fd >= 0)
			close(fd);
		return NULL;
	}
	if (fd < 0) {
		buf[0] = 0;
		return buf;
	}
	for (;;) {
		if (len == cap) {
			if (cap >= MAX_DB)
				break;
			char *nb = realloc(buf, cap * 2 + 1);
			if (!nb)
				break;
			buf = nb;
			cap *= 2;
		}
		ssize_t r = read(fd, buf + len, cap - len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		len += (size_t)r;
	}
	close(fd);
	buf[len] = 0;
	return buf;
}

/* Split a line into at most `max` ':'-separated fields in place. Returns the count. */
static int split(char *line, char **f, int max)
{
	int n = 0;
	f[n++] = line;
	for (char *p = line; *p && n < max; p++) {
		if (*p == ':') {
			*p = 0;
			f[n++] = p + 1;
		}
	}
	return n;
}

static int parse_id(const char *s, unsigned long *out)
{
	if (!*s)
		return -1;
	unsigned long v = 0;
	for (const char *p = s; *p; p++) {
		if (*p < '0' || *p > '9')
			return -1;
		v = v * 10 + (unsigned long)(*p - '0');
		if (v > 0xfffffffeUL)
			return -1;
	}
	*out = v;
	return 0;
}

/* Iterate the lines of a database; calls fn with the fields of each; fn returns 1 to stop. */
static void each_line(char *db, int nf, int (*fn)(char **f, int n, void *ctx), void *ctx)
{
	char *f[8];
	for (char *line = db; line && *line;) {
		char *nl = strchr(line, '\n');
		if (nl)
			*nl = 0;
		char *next = nl ? nl + 1 : NULL;
		if (*line && *line != '#') {
			int n = split(line, f, nf);
			if (fn(f, n, ctx))
				return;
		}
		line = next;
	}
}

struct pwq {
	const char *name; /* look up by name, or */
	unsigned long uid; /* by uid when name is NULL */
	int found;
	char uname[256];
	unsigned long puid, pgid;
	char home[512];
};

static int pw_fn(char **f, int n, void *ctx)
{
	struct pwq *q = ctx;
	unsigned long uid, gid;
	if (n < 7 || parse_id(f[2], &uid) || parse_id(f[3], &gid))
		return 0;
	if (q->name ? strcmp(f[0], q->name) != 0 : uid != q->uid)
		return 0;
	q->found = 1;
	q->puid = uid;
	q->pgid = gid;
	snprintf(q->uname, sizeof q->uname, "%s", f[0]);
	snprintf(q->home, sizeof q->home, "%s", *f[5] ? f[5] : "/");
	return 1;
}

struct grq {
	const char *name; /* resolve this group name */
	int found;
	unsigned long gid;
	const char *member; /* collect supplementary groups of this user */
	struct sm_user *u;
};

static int gr_fn(char **f, int n, void *ctx)
{
	struct grq *q = ctx;
	unsigned long gid;
	if (n < 4 || parse_id(f[2], &gid))
		return 0;
	if (q->name) {
		if (strcmp(f[0], q->name) == 0) {
			q->found = 1;
			q->gid = gid;
			return 1;
		}
		return 0;
	}
	/* member list: comma separated */
	for (char *m = f[3]; m && *m;) {
		char *c = strchr(m, ',');
		size_t l = c ? (size_t)(c - m) : strlen(m);
		if (l == strlen(q->member) && !strncmp(m, q->member, l)) {
			struct sm_user *u = q->u;
			int dup = 0;
			for (int i = 0; i < u->ngroups; i++)
				dup |= u->groups[i] == (gid_t)gid;
			if (!dup && u->ngroups < (int)(sizeof u->groups / sizeof u->groups[0]))
				u->groups[u->ngroups++] = (gid_t)gid;
			break;
		}
		m = c ? c + 1 : NULL;
	}
	return 0;
}

int sm_resolve_user(const char *spec, struct sm_user *u, char *msg, size_t msglen)
{
	char buf[512];
	int dflt = !spec || !*spec;
	snprintf(buf, sizeof buf, "%s", dflt ? "root" : spec);
	char *group = strchr(buf, ':');
	if (group)
		*group++ = 0;
	memset(u, 0, sizeof *u);

	char *pw = slurp("/etc/passwd");
	char *gr = slurp("/etc/group");
	if (!pw || !gr) {
		free(pw);
		free(gr);
		snprintf(msg, msglen, "out of memory reading /etc/passwd");
		return ENOMEM;
	}
	int rc = 0;
	struct pwq q = { 0 };
	unsigned long id;
	if (parse_id(buf, &id) == 0) {
		q.uid = id;
		each_line(pw, 7, pw_fn, &q);
		u->uid = (uid_t)id;
		u->gid = q.found ? (gid_t)q.pgid : 0;
	} else {
		q.name = buf;
		each_line(pw, 7, pw_fn, &q);
		if (!q.found) {
			if (dflt) {
				u->uid = 0; /* an image without /etc/passwd still runs as root */
			} else {
				snprintf(msg, msglen, "unknown user %s (not in /etc/passwd)", buf);
				rc = ENOENT;
				goto out;
			}
		} else {
			u->uid = (uid_t)q.puid;
			u->gid = (gid_t)q.pgid;
		}
	}
	snprintf(u->home, sizeof u->home, "%s", q.found ? q.home : "/");
	if (group) {
		if (parse_id(group, &id) == 0) {
			u->gid = (gid_t)id;
		} else {
			char *g2 = strdup(gr);
			struct grq g = { .name = group };
			if (g2)
				each_line(g2, 4, gr_fn, &g);
			free(g2);
			if (!g.found) {
				snprintf(msg, msglen, "unknown group %s (not in /etc/group)", group);
				rc = ENOENT;
				goto out;
			}
			u->gid = (gid_t)g.gid;
		}
	}
	u->groups[u->ngroups++] = u->gid;
	if (q.found) {
		struct grq g = { .member = q.uname, .u = u };
		each_line(gr, 4, gr_fn, &g);
	}
out:
	free(pw);
	free(gr);
	return rc;
}
