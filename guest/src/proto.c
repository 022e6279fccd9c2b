#include "proto.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void sm_hdr_encode(uint8_t out[SM_HDR_SIZE], const struct sm_hdr *h)
{
	sm_put32(out, h->length);
	sm_put32(out + 4, h->stream);
	out[8] = h->type;
	out[9] = h->flags;
}

int sm_hdr_decode(const uint8_t in[SM_HDR_SIZE], struct sm_hdr *h)
{
	h->length = sm_be32(in);
	h->stream = sm_be32(in + 4);
	h->type = in[8];
	h->flags = in[9];
	if (h->length > SM_MAX_PAYLOAD || (h->flags & ~SM_FLAG_FIN))
		return -1;
	return 0;
}

const char *sm_type_name(unsigned type)
{
	switch (type) {
	case SM_HELLO: return "HELLO";
	case SM_PING: return "PING";
	case SM_PONG: return "PONG";
	case SM_SHUTDOWN: return "SHUTDOWN";
	case SM_ERROR: return "ERROR";
	case SM_RESET: return "RESET";
	case SM_EXEC: return "EXEC";
	case SM_STAGE_DATA: return "STAGE_DATA";
	case SM_STDIN: return "STDIN";
	case SM_STDOUT: return "STDOUT";
	case SM_STDERR: return "STDERR";
	case SM_WINDOW: return "WINDOW";
	case SM_RESIZE: return "RESIZE";
	case SM_SIGNAL: return "SIGNAL";
	case SM_STARTED: return "STARTED";
	case SM_EXIT: return "EXIT";
	case SM_WORKLOAD_START: return "WORKLOAD_START";
	case SM_WORKLOAD_QUERY: return "WORKLOAD_QUERY";
	case SM_WORKLOAD_SIGNAL: return "WORKLOAD_SIGNAL";
	case SM_FREEZE: return "FREEZE";
	case SM_WORKLOAD_LOGS: return "WORKLOAD_LOGS";
	case SM_WORKLOAD_STATUS: return "WORKLOAD_STATUS";
	case SM_WRITE_FILE: return "WRITE_FILE";
	case SM_READ_FILE: return "READ_FILE";
	case SM_FILE_DATA: return "FILE_DATA";
	case SM_FILE_INFO: return "FILE_INFO";
	case SM_OK: return "OK";
	case SM_FS: return "FS";
	case SM_STAT: return "STAT";
	case SM_DIRENTS: return "DIRENTS";
	case SM_WATCH: return "WATCH";
	case SM_WATCH_EVENT: return "WATCH_EVENT";
	case SM_TCP_CONNECT: return "TCP_CONNECT";
	case SM_TCP_CONNECTED: return "TCP_CONNECTED";
	case SM_TCP_DATA: return "TCP_DATA";
	default: return "?";
	}
}

/* ---- encoding ---- */

static int reserve(struct sm_buf *b, size_t more)
{
	if (b->oom)
		return -1;
	if (more > SM_HDR_SIZE + SM_MAX_PAYLOAD || b->len + more > SM_HDR_SIZE + SM_MAX_PAYLOAD) {
		b->oom = 1;
		return -1;
	}
	if (b->len + more <= b->cap)
		return 0;
	size_t cap = b->cap ? b->cap : 256;
	while (cap < b->len + more)
		cap *= 2;
	uint8_t *d = realloc(b->data, cap);
	if (!d) {
		b->oom = 1;
		return -1;
	}
	b->data = d;
	b->cap = cap;
	return 0;
}

void sm_frame_begin(struct sm_buf *b)
{
	b->len = 0;
	b->oom = 0;
	if (reserve(b, SM_HDR_SIZE) == 0)
		b->len = SM_HDR_SIZE;
}

size_t sm_frame_end(struct sm_buf *b, uint32_t stream, uint8_t type, uint8_t flags)
{
	if (b->oom || b->len < SM_HDR_SIZE)
		return 0;
	struct sm_hdr h = { (uint32_t)(b->len - SM_HDR_SIZE), stream, type, flags };
	sm_hdr_encode(b->data, &h);
	return b->len;
}

void sm_buf_free(struct sm_buf *b)
{
	free(b->data);
	b->data = NULL;
	b->len = b->cap = 0;
}

void sm_buf_raw(struct sm_buf *b, const void *p, size_t n)
{
	if (reserve(b, n))
		return;
	if (n)
		memcpy(b->data + b->len, p, n);
	b->len += n;
}

static uint8_t *field(struct sm_buf *b, uint8_t tag, size_t n)
{
	if (n > SM_MAX_PAYLOAD || reserve(b, 5 + n))
		return NULL;
	uint8_t *p = b->data + b->len;
	p[0] = tag;
	sm_put32(p + 1, (uint32_t)n);
	b->len += 5 + n;
	return p + 5;
}

void sm_put_u8(struct sm_buf *b, uint8_t tag, uint8_t v)
{
	uint8_t *p = field(b, tag, 1);
	if (p)
		p[0] = v;
}

void sm_put_u16(struct sm_buf *b, uint8_t tag, uint16_t v)
{
	uint8_t *p = field(b, tag, 2);
	if (p)
		sm_put16(p, v);
}

void sm_put_u32(struct sm_buf *b, uint8_t tag, uint32_t v)
{
	uint8_t *p = field(b, tag, 4);
	if (p)
		sm_put32(p, v);
}

void sm_put_u64(struct sm_buf *b, uint8_t tag, uint64_t v)
{
	uint8_t *p = field(b, tag, 8);
	if (p)
		sm_put64(p, v);
}

void sm_put_i32(struct sm_buf *b, uint8_t tag, int32_t v) { sm_put_u32(b, tag, (uint32_t)v); }

void sm_put_bytes(struct sm_buf *b, uint8_t tag, const void *v, size_t n)
{
	uint8_t *p = field(b, tag, n);
	if (p && n)
		memcpy(p, v, n);
}

void sm_put_str(struct sm_buf *b, uint8_t tag, const char *s) { sm_put_bytes(b, tag, s, strlen(s)); }

size_t sm_nested_begin(struct sm_buf *b, uint8_t tag)
{
	size_t mark = b->len;
	field(b, tag, 0);
	return mark;
}

void sm_nested_end(struct sm_buf *b, size_t mark)
{
	if (b->oom)
		return;
	sm_put32(b->data + mark + 1, (uint32_t)(b->len - mark - 5));
}

/* ---- decoding ---- */

int sm_fields_split(const uint8_t *p, size_t n, struct sm_field *out, size_t max)
{
	size_t off = 0;
	int count = 0;
	if (max > SM_MAX_FIELDS)
		max = SM_MAX_FIELDS;
	while (off < n) {
		if (n - off < 5 || (size_t)count >= max)
			return -1;
		uint32_t len = sm_be32(p + off + 1);
		if (len > n - off - 5)
			return -1;
		out[count].tag = p[off];
		out[count].len = len;
		out[count].val = p + off + 5;
		count++;
		off += 5 + (size_t)len;
	}
	return count;
}

int sm_utf8_valid(const uint8_t *p, size_t n)
{
	size_t i = 0;
	while (i < n) {
		uint8_t c = p[i];
		if (c < 0x80) {
			i++;
			continue;
		}
		size_t need;
		uint32_t cp;
		if (c >= 0xc2 && c <= 0xdf) {
			need = 1;
			cp = c & 0x1f;
		} else if (c >= 0xe0 && c <= 0xef) {
			need = 2;
			cp = c & 0x0f;
		} else if (c >= 0xf0 && c <= 0xf4) {
			need = 3;
			cp = c & 0x07;
		} else {
			return 0;
		}
		if (n - i <= need)
			return 0;
		for (size_t k = 1; k <= need; k++) {
			if ((p[i + k] & 0xc0) != 0x80)
				return 0;
			cp = (cp << 6) | (p[i + k] & 0x3f);
		}
		if ((need == 2 && cp < 0x800) || (need == 3 && (cp < 0x10000 || cp > 0x10ffff)) ||
		    (cp >= 0xd800 && cp <= 0xdfff))
			return 0;
		i += need + 1;
	}
	return 1;
}

static const char *kind_name(unsigned k)
{
	static const char *names[] = { "u8", "u16", "u32", "u64", "i32", "string", "bytes", "nested" };
	return k < sizeof names / sizeof names[0] ? names[k] : "?";
}

/* Scratch space to validate nested sequences (only their shape is checked here). */
static struct sm_field nested_scratch[SM_MAX_FIELDS];

int sm_fields_check(const struct sm_field *f, int n, const struct sm_spec *spec, size_t nspec, char *err,
		    size_t errlen)
{
	unsigned seen[16] = { 0 }; /* counts per spec entry; schemas are small */
	if (nspec > 16) {
		snprintf(err, errlen, "internal: schema too large");
		return -1;
	}
	for (int i = 0; i < n; i++) {
		size_t s;
		for (s = 0; s < nspec && spec[s].tag != f[i].tag; s++)
			;
		if (s == nspec)
			continue; /* unknown tag: ignored */
		const struct sm_spec *sp = &spec[s];
		if (seen[s]++ && !(sp->flags & SM_REP)) {
			snprintf(err, errlen, "field %u repeated", sp->tag);
			return -1;
		}
		uint32_t want = 0;
		switch (sp->kind) {
		case SM_K_U8: want = 1; break;
		case SM_K_U16: want = 2; break;
		case SM_K_U32: case SM_K_I32: want = 4; break;
		case SM_K_U64: want = 8; break;
		default: break;
		}
		if (want && f[i].len != want) {
			snprintf(err, errlen, "field %u: %s of %u bytes", sp->tag, kind_name(sp->kind), f[i].len);
			return -1;
		}
		if (sp->kind == SM_K_STRING) {
			if (memchr(f[i].val, 0, f[i].len) || !sm_utf8_valid(f[i].val, f[i].len)) {
				snprintf(err, errlen, "field %u: not a UTF-8 string without NUL", sp->tag);
				return -1;
			}
		}
		if (sp->kind == SM_K_NESTED &&
		    sm_fields_split(f[i].val, f[i].len, nested_scratch, SM_MAX_FIELDS) < 0) {
			snprintf(err, errlen, "field %u: malformed nested fields", sp->tag);
			return -1;
		}
	}
	for (size_t s = 0; s < nspec; s++) {
		if ((spec[s].flags & SM_REQ) && !seen[s]) {
			snprintf(err, errlen, "required field %u missing", spec[s].tag);
			return -1;
		}
	}
	return 0;
}

const struct sm_field *sm_find(const struct sm_field *f, int n, uint8_t tag)
{
	for (int i = 0; i < n; i++)
		if (f[i].tag == tag)
			return &f[i];
	return NULL;
}

uint64_t sm_uval(const struct sm_field *f)
{
	switch (f->len) {
	case 1: return f->val[0];
	case 2: return sm_be16(f->val);
	case 4: return sm_be32(f->val);
	case 8: return sm_be64(f->val);
	default: return 0;
	}
}

int32_t sm_ival(const struct sm_field *f) { return (int32_t)sm_be32(f->val); }

uint64_t sm_get_u(const struct sm_field *f, int n, uint8_t tag, uint64_t dflt)
{
	const struct sm_field *x = sm_find(f, n, tag);
	return x ? sm_uval(x) : dflt;
}

/* ---- message schemas ---- */

int sm_type_from_host(unsigned t)
{
	switch (t) {
	case SM_HELLO: case SM_PING: case SM_SHUTDOWN: case SM_RESET: case SM_EXEC: case SM_STAGE_DATA:
	case SM_STDIN: case SM_WINDOW: case SM_RESIZE: case SM_SIGNAL: case SM_WRITE_FILE: case SM_READ_FILE:
	case SM_FILE_DATA: case SM_WORKLOAD_START: case SM_WORKLOAD_QUERY: case SM_WORKLOAD_SIGNAL:
	case SM_WORKLOAD_LOGS: case SM_FS: case SM_WATCH: case SM_TCP_CONNECT: case SM_TCP_DATA: case SM_FREEZE:
		return 1;
	default:
		return 0;
	}
}

int sm_type_from_guest(unsigned t)
{
	switch (t) {
	case SM_HELLO: case SM_PONG: case SM_ERROR: case SM_STDOUT: case SM_STDERR: case SM_WINDOW:
	case SM_STARTED: case SM_EXIT: case SM_FILE_DATA: case SM_FILE_INFO: case SM_OK: case SM_WORKLOAD_STATUS:
	case SM_STAT: case SM_DIRENTS: case SM_WATCH_EVENT: case SM_TCP_CONNECTED: case SM_TCP_DATA:
		return 1;
	default:
		return 0;
	}
}

int sm_type_known(unsigned t) { return sm_type_from_host(t) || sm_type_from_guest(t); }

int sm_type_opens_stream(unsigned t)
{
	switch (t) {
	case SM_EXEC: case SM_WRITE_FILE: case SM_READ_FILE: case SM_WORKLOAD_START: case SM_WORKLOAD_QUERY:
	case SM_WORKLOAD_SIGNAL: case SM_WORKLOAD_LOGS: case SM_FS: case SM_WATCH: case SM_TCP_CONNECT: case SM_FREEZE:
		return 1;
	default:
		return 0;
	}
}

int sm_type_takes_fin(unsigned t)
{
	return t == SM_STAGE_DATA || t == SM_STDIN || t == SM_FILE_DATA || t == SM_TCP_DATA;
}

#define SPEC(...) ((const struct sm_spec[]){ __VA_ARGS__ }), sizeof((const struct sm_spec[]){ __VA_ARGS__ }) / sizeof(struct sm_spec)

static struct sm_field top[SM_MAX_FIELDS];
static struct sm_field inner[SM_MAX_FIELDS];

static int check(const uint8_t *p, size_t n, const struct sm_spec *spec, size_t nspec, int *count, char *err,
		 size_t errlen, struct sm_field *f)
{
	int k = sm_fields_split(p, n, f, SM_MAX_FIELDS);
	if (k < 0) {
		snprintf(err, errlen, "malformed fields (truncated, overrunning or more than %u)", SM_MAX_FIELDS);
		return -1;
	}
	if (count)
		*count = k;
	return sm_fields_check(f, k, spec, nspec, err, errlen);
}

static int check_nested(int n, uint8_t tag, const struct sm_spec *spec, size_t nspec, const char *name, char *err,
			size_t errlen)
{
	char sub[200];
	for (int i = 0; i < n; i++) {
		if (top[i].tag != tag)
			continue;
		if (check(top[i].val, top[i].len, spec, nspec, NULL, sub, sizeof sub, inner)) {
			snprintf(err, errlen, "%s: %s", name, sub);
			return -1;
		}
	}
	return 0;
}

int sm_msg_check(unsigned type, int from_host, const uint8_t *p, size_t n, char *err, size_t errlen)
{
	int k = 0;
	switch (type) {
	case SM_HELLO:
		if (from_host) {
			if (check(p, n, SPEC({ 1, SM_K_U32, SM_REQ }, { 2, SM_K_U64, SM_REQ }, { 3, SM_K_U64, 0 },
					     { 4, SM_K_BYTES, 0 }, { 7, SM_K_STRING, 0 }, { 8, SM_K_STRING, 0 }),
				  &k, err, errlen, top))
				return -1;
			const struct sm_field *e = sm_find(top, k, 4);
			if (e && (e->len < 32 || e->len > 512)) {
				snprintf(err, errlen, "entropy of %u bytes (32-512)", e->len);
				return -1;
			}
			const struct sm_field *id = sm_find(top, k, 7);
			if (id && !sm_machine_id_valid(id->val, id->len)) {
				snprintf(err, errlen, "machineId must be 32 lowercase hex digits");
				return -1;
			}
			const struct sm_field *name = sm_find(top, k, 8);
			if (name && !sm_hostname_valid(name->val, name->len)) {
				snprintf(err, errlen, "hostname must be 1-64 letters, digits, '-' and '.'");
				return -1;
			}
			return 0;
		}
		return check(p, n, SPEC({ 1, SM_K_U32, SM_REQ }, { 2, SM_K_U64, SM_REQ }, { 5, SM_K_STRING, 0 },
				       { 6, SM_K_U64, 0 }), NULL, err, errlen, top);
	case SM_PING:
	case SM_PONG:
		if (n > 64) {
			snprintf(err, errlen, "payload of %zu bytes (at most 64)", n);
			return -1;
		}
		return 0;
	case SM_SHUTDOWN:
	case SM_RESET:
		if (n) {
			snprintf(err, errlen, "payload must be empty");
			return -1;
		}
		return 0;
	case SM_ERROR: {
		if (check(p, n, SPEC({ 1, SM_K_U32, SM_REQ }, { 2, SM_K_U32, 0 }, { 3, SM_K_STRING, 0 }), &k, err,
			  errlen, top))
			return -1;
		const struct sm_field *m = sm_find(top, k, 3);
		if (m && m->len > 4096) {
			snprintf(err, errlen, "message of %u bytes (at most 4096)", m->len);
			return -1;
		}
		return 0;
	}
	case SM_EXEC:
		if (check(p, n, SPEC({ 1, SM_K_STRING, SM_REQ | SM_REP }, { 2, SM_K_STRING, SM_REP }, { 3, SM_K_STRING, 0 },
				     { 4, SM_K_STRING, 0 }, { 5, SM_K_U8, 0 }, { 6, SM_K_U16, 0 }, { 7, SM_K_U16, 0 },
				     { 8, SM_K_U32, 0 }, { 9, SM_K_U32, 0 }, { 10, SM_K_NESTED, SM_REP },
				     { 11, SM_K_U8, 0 }, { 12, SM_K_U32, 0 }, { 13, SM_K_NESTED, SM_REP }), &k, err, errlen, top))
			return -1;
		if (check_nested(k, 10, SPEC({ 1, SM_K_STRING, SM_REQ | SM_REP }), "chain", err, errlen))
			return -1;
		return check_nested(k, 13, SPEC({ 1, SM_K_STRING, SM_REQ }, { 2, SM_K_U32, 0 }, { 3, SM_K_U64, SM_REQ }),
				    "stage", err, errlen);
	case SM_STAGE_DATA:
	case SM_STDIN:
	case SM_STDOUT:
	case SM_STDERR:
	case SM_FILE_DATA:
	case SM_TCP_DATA:
		return 0;
	case SM_WINDOW:
		if (n != 4) {
			snprintf(err, errlen, "WINDOW payload of %zu bytes (must be 4)", n);
			return -1;
		}
		return 0;
	case SM_RESIZE:
		return check(p, n, SPEC({ 1, SM_K_U16, SM_REQ }, { 2, SM_K_U16, SM_REQ }), NULL, err, errlen, top);
	case SM_SIGNAL:
		return check(p, n, SPEC({ 1, SM_K_U32, SM_REQ }), NULL, err, errlen, top);
	case SM_STARTED:
		return check(p, n, SPEC({ 1, SM_K_U32, SM_REQ }), NULL, err, errlen, top);
	case SM_EXIT:
		if (check(p, n, SPEC({ 1, SM_K_I32, 0 }, { 2, SM_K_U32, 0 }, { 3, SM_K_U8, 0 }, { 4, SM_K_U64, 0 },
				     { 5, SM_K_U64, 0 }, { 6, SM_K_U32, 0 }), &k, err, errlen, top))
			return -1;
		if (!sm_find(top, k, 1) == !sm_find(top, k, 2)) {
			snprintf(err, errlen, "exactly one of exitCode and signal must be present");
			return -1;
		}
		return 0;
	case SM_WRITE_FILE:
		return check(p, n, SPEC({ 1, SM_K_STRING, SM_REQ }, { 2, SM_K_U32, 0 }, { 3, SM_K_U32, 0 }, { 4, SM_K_U32, 0 },
				       { 5, SM_K_U64, SM_REQ }, { 6, SM_K_U8, 0 }), NULL, err, errlen, top);
	case SM_READ_FILE:
		return check(p, n, SPEC({ 1, SM_K_STRING, SM_REQ }, { 2, SM_K_U32, 0 }), NULL, err, errlen, top);
	case SM_FILE_INFO:
		return check(p, n, SPEC({ 1, SM_K_U64, SM_REQ }, { 2, SM_K_U32, 0 }, { 3, SM_K_U32, 0 }, { 4, SM_K_U32, 0 }),
			     NULL, err, errlen, top);
	case SM_OK:
		return check(p, n, SPEC({ 1, SM_K_U64, 0 }, { 2, SM_K_BYTES, 0 }), NULL, err, errlen, top);
	/* ---- the workload ---- */
	case SM_WORKLOAD_START:
		return check(p, n, SPEC({ 1, SM_K_STRING, SM_REQ | SM_REP }, { 2, SM_K_STRING, SM_REP }, { 3, SM_K_STRING, 0 },
				       { 4, SM_K_STRING, 0 }), NULL, err, errlen, top);
	case SM_WORKLOAD_QUERY:
		return check(p, n, NULL, 0, NULL, err, errlen, top);
	case SM_WORKLOAD_SIGNAL:
		return check(p, n, SPEC({ 1, SM_K_U32, SM_REQ }), NULL, err, errlen, top);
	case SM_WORKLOAD_LOGS:
		return check(p, n, SPEC({ 1, SM_K_U8, 0 }, { 2, SM_K_U32, 0 }, { 3, SM_K_U8, 0 }), NULL, err, errlen, top);
	case SM_FREEZE:
		return check(p, n, SPEC({ 1, SM_K_U8, SM_REQ }), NULL, err, errlen, top);
	case SM_WORKLOAD_STATUS:
		return check(p, n, SPEC({ 1, SM_K_U8, SM_REQ }, { 2, SM_K_U32, 0 }, { 3, SM_K_I32, 0 }, { 4, SM_K_U32, 0 }), NULL,
			     err, errlen, top);
	/* ---- file-system operations and watches ---- */
	case SM_FS:
		return check(p, n, SPEC({ 1, SM_K_U8, SM_REQ }, { 2, SM_K_STRING, SM_REQ }, { 3, SM_K_STRING, 0 }, { 4, SM_K_U32, 0 },
				       { 5, SM_K_U32, 0 }, { 6, SM_K_U32, 0 }, { 7, SM_K_U32, 0 }, { 8, SM_K_U64, 0 },
				       { 9, SM_K_U64, 0 }, { 10, SM_K_U64, 0 }, { 11, SM_K_U32, 0 }), NULL, err, errlen, top);
	case SM_STAT:
		return check(p, n, SPEC({ 1, SM_K_U32, SM_REQ }, { 2, SM_K_U32, 0 }, { 3, SM_K_U32, 0 }, { 4, SM_K_U64, 0 },
				       { 5, SM_K_U64, 0 }, { 6, SM_K_U64, 0 }, { 7, SM_K_U64, 0 }, { 8, SM_K_U64, 0 },
				       { 9, SM_K_U64, 0 }, { 10, SM_K_U64, 0 }, { 11, SM_K_U64, 0 }, { 12, SM_K_U64, 0 },
				       { 13, SM_K_U32, 0 }), NULL, err, errlen, top);
	case SM_DIRENTS:
		if (check(p, n, SPEC({ 1, SM_K_NESTED, SM_REP }), &k, err, errlen, top))
			return -1;
		return check_nested(k, 1, SPEC({ 1, SM_K_BYTES, SM_REQ }, { 2, SM_K_U8, 0 }), "entry", err, errlen);
	case SM_WATCH:
		return check(p, n, SPEC({ 1, SM_K_STRING, SM_REQ }, { 2, SM_K_U8, 0 }, { 3, SM_K_U32, 0 }), NULL, err, errlen, top);
	case SM_WATCH_EVENT:
		return check(p, n, SPEC({ 1, SM_K_U8, SM_REQ }, { 2, SM_K_BYTES, 0 }, { 3, SM_K_U8, 0 }), NULL, err, errlen, top);
	/* ---- TCP tunnels ---- */
	case SM_TCP_CONNECT:
		return check(p, n, SPEC({ 1, SM_K_U16, SM_REQ }, { 2, SM_K_STRING, 0 }, { 3, SM_K_U32, 0 }), NULL, err, errlen, top);
	case SM_TCP_CONNECTED:
		return check(p, n, NULL, 0, NULL, err, errlen, top);
	default:
		snprintf(err, errlen, "unknown message type 0x%02x", type);
		return -1;
	}
}

int sm_machine_id_valid(const uint8_t *p, size_t n)
{
	if (n != 32)
		return 0;
	for (size_t i = 0; i < n; i++)
		if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f')))
			return 0;
	return 1;
}

int sm_hostname_valid(const uint8_t *p, size_t n)
{
	if (n < 1 || n > 64 || p[0] == '-' || p[0] == '.')
		return 0;
	for (size_t i = 0; i < n; i++) {
		uint8_t c = p[i];
		if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '-' || c == '.'))
			return 0;
	}
	return 1;
}
