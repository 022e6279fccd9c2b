/* Codec tests: header and field encoding/decoding, limits, schemas, and the golden fixtures in
 * test/fixtures/protocol (decode, check against the description, re-encode, compare bytes).
 * Usage: test-proto FIXTURE_DIR */
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "mount.h"
#include "proto.h"

static int failures, checks;
static const char *current = "";

static void fail(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "FAIL [%s] ", current);
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	failures++;
}

#define CHECK(cond, ...)                                                                                              \
	do {                                                                                                          \
		checks++;                                                                                             \
		if (!(cond))                                                                                          \
			fail(__VA_ARGS__);                                                                            \
	} while (0)

/* ------------------------------------------------------------------------------------------------ */

static void test_header(void)
{
	current = "header";
	uint8_t b[SM_HDR_SIZE];
	struct sm_hdr h = { 0x01020304, 0xa0b0c0d0, SM_EXEC, SM_FLAG_FIN }, d;
	h.length = SM_MAX_PAYLOAD;
	sm_hdr_encode(b, &h);
	CHECK(b[0] == 0x00 && b[1] == 0x10 && b[2] == 0 && b[3] == 0, "length big-endian");
	CHECK(b[4] == 0xa0 && b[7] == 0xd0 && b[8] == 0x10 && b[9] == 1, "stream/type/flags layout");
	CHECK(sm_hdr_decode(b, &d) == 0 && d.length == SM_MAX_PAYLOAD && d.stream == 0xa0b0c0d0 && d.type == SM_EXEC &&
		      d.flags == SM_FLAG_FIN,
	      "round trip at MAX_PAYLOAD");
	h.length = SM_MAX_PAYLOAD + 1;
	sm_hdr_encode(b, &h);
	CHECK(sm_hdr_decode(b, &d) < 0, "length over MAX_PAYLOAD rejected");
	h.length = 0;
	for (int bit = 1; bit < 8; bit++) {
		h.flags = (uint8_t)(1u << bit);
		sm_hdr_encode(b, &h);
		CHECK(sm_hdr_decode(b, &d) < 0, "reserved flag bit %d rejected", bit);
	}
}

static void test_fields(void)
{
	current = "fields";
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	sm_put_u8(&b, 1, 0xab);
	sm_put_u16(&b, 2, 0x1234);
	sm_put_u32(&b, 3, 0xdeadbeef);
	sm_put_u64(&b, 4, 0x0102030405060708ull);
	sm_put_i32(&b, 5, -2);
	sm_put_str(&b, 6, "héllo");
	sm_put_bytes(&b, 7, "\0\1\2", 3);
	size_t m = sm_nested_begin(&b, 8);
	sm_put_str(&b, 1, "a");
	sm_put_str(&b, 1, "b");
	sm_nested_end(&b, m);
	size_t len = sm_frame_end(&b, 9, SM_EXEC, 0);
	CHECK(len == b.len && len > SM_HDR_SIZE, "frame built");
	struct sm_hdr h;
	CHECK(sm_hdr_decode(b.data, &h) == 0 && h.length == len - SM_HDR_SIZE && h.stream == 9, "header filled in");
	static struct sm_field f[SM_MAX_FIELDS];
	int n = sm_fields_split(b.data + SM_HDR_SIZE, h.length, f, SM_MAX_FIELDS);
	CHECK(n == 8, "8 fields, got %d", n);
	CHECK(sm_uval(&f[0]) == 0xab && sm_uval(&f[1]) == 0x1234 && sm_uval(&f[2]) == 0xdeadbeef &&
		      sm_uval(&f[3]) == 0x0102030405060708ull && sm_ival(&f[4]) == -2,
	      "integer values");
	CHECK(f[5].len == 6 && !memcmp(f[5].val, "héllo", 6), "string value");
	CHECK(f[6].len == 3 && f[6].val[0] == 0 && f[6].val[2] == 2, "bytes value");
	static struct sm_field g[16];
	int k = sm_fields_split(f[7].val, f[7].len, g, 16);
	CHECK(k == 2 && g[0].len == 1 && g[0].val[0] == 'a' && g[1].val[0] == 'b', "nested value");

	const struct sm_spec spec[] = {
		{ 1, SM_K_U8, SM_REQ }, { 2, SM_K_U16, 0 }, { 3, SM_K_U32, 0 }, { 4, SM_K_U64, 0 },
		{ 5, SM_K_I32, 0 },     { 6, SM_K_STRING, 0 }, { 7, SM_K_BYTES, 0 }, { 8, SM_K_NESTED, 0 },
	};
	char err[200];
	CHECK(sm_fields_check(f, n, spec, 8, err, sizeof err) == 0, "valid fields accepted: %s", err);
	const struct sm_spec wrong[] = { { 1, SM_K_U16, 0 } };
	CHECK(sm_fields_check(f, n, wrong, 1, err, sizeof err) < 0, "u8 where u16 expected rejected");
	const struct sm_spec req[] = { { 42, SM_K_U8, SM_REQ } };
	CHECK(sm_fields_check(f, n, req, 1, err, sizeof err) < 0, "missing required rejected");
	const struct sm_spec unknown_ok[] = { { 1, SM_K_U8, 0 } };
	CHECK(sm_fields_check(f, n, unknown_ok, 1, err, sizeof err) == 0, "unknown tags ignored");

	/* duplicates */
	sm_frame_begin(&b);
	sm_put_u8(&b, 1, 1);
	sm_put_u8(&b, 1, 2);
	n = sm_fields_split(b.data + SM_HDR_SIZE, b.len - SM_HDR_SIZE, f, SM_MAX_FIELDS);
	CHECK(n == 2 && sm_fields_check(f, n, unknown_ok, 1, err, sizeof err) < 0, "duplicate non-repeated rejected");
	const struct sm_spec rep[] = { { 1, SM_K_U8, SM_REP } };
	CHECK(sm_fields_check(f, n, rep, 1, err, sizeof err) == 0, "repeated accepted");

	/* strings: NUL, bad UTF-8 */
	sm_frame_begin(&b);
	sm_put_bytes(&b, 1, "a\0b", 3);
	n = sm_fields_split(b.data + SM_HDR_SIZE, b.len - SM_HDR_SIZE, f, SM_MAX_FIELDS);
	const struct sm_spec str[] = { { 1, SM_K_STRING, 0 } };
	CHECK(sm_fields_check(f, n, str, 1, err, sizeof err) < 0, "string with NUL rejected");
	sm_frame_begin(&b);
	sm_put_bytes(&b, 1, "\xc3", 1);
	n = sm_fields_split(b.data + SM_HDR_SIZE, b.len - SM_HDR_SIZE, f, SM_MAX_FIELDS);
	CHECK(sm_fields_check(f, n, str, 1, err, sizeof err) < 0, "truncated UTF-8 rejected");

	/* truncated and overrunning sequences */
	const uint8_t trunc[] = { 1, 0, 0, 0 };
	CHECK(sm_fields_split(trunc, sizeof trunc, f, SM_MAX_FIELDS) < 0, "truncated field header");
	const uint8_t over[] = { 1, 0, 0, 0, 5, 1, 2 };
	CHECK(sm_fields_split(over, sizeof over, f, SM_MAX_FIELDS) < 0, "field overrunning the payload");
	CHECK(sm_fields_split(over, 0, f, SM_MAX_FIELDS) == 0, "empty sequence");

	/* field count limit */
	sm_frame_begin(&b);
	for (unsigned i = 0; i < SM_MAX_FIELDS; i++)
		sm_put_bytes(&b, 2, "", 0);
	CHECK(sm_fields_split(b.data + SM_HDR_SIZE, b.len - SM_HDR_SIZE, f, SM_MAX_FIELDS) == (int)SM_MAX_FIELDS,
	      "8192 fields accepted");
	sm_put_bytes(&b, 2, "", 0);
	CHECK(sm_fields_split(b.data + SM_HDR_SIZE, b.len - SM_HDR_SIZE, f, SM_MAX_FIELDS) < 0, "8193 fields rejected");

	/* encoder refuses to exceed MAX_PAYLOAD */
	sm_frame_begin(&b);
	static uint8_t big[SM_MAX_PAYLOAD];
	sm_put_bytes(&b, 1, big, SM_MAX_PAYLOAD - 5);
	CHECK(sm_frame_end(&b, 1, SM_STDOUT, 0) == SM_HDR_SIZE + SM_MAX_PAYLOAD, "exactly MAX_PAYLOAD fits");
	sm_put_u8(&b, 2, 0);
	CHECK(b.oom && sm_frame_end(&b, 1, SM_STDOUT, 0) == 0, "one byte more is refused");
	sm_buf_free(&b);
}

static void test_utf8(void)
{
	current = "utf8";
	struct {
		const char *s;
		int ok;
	} cases[] = {
		{ "plain", 1 },         { "h\xc3\xa9llo \xe2\x9c\x93", 1 }, { "\xf0\x9f\x98\x80", 1 },
		{ "\xc0\xaf", 0 },      { "\xe0\x80\xaf", 0 },              { "\xed\xa0\x80", 0 },
		{ "\xf4\x90\x80\x80", 0 }, { "\xff", 0 },                 { "\x80", 0 },
		{ "\xe2\x9c", 0 },
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
		CHECK(sm_utf8_valid((const uint8_t *)cases[i].s, strlen(cases[i].s)) == cases[i].ok, "case %zu", i);
}

static void test_schemas(void)
{
	current = "schemas";
	char err[200];
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	sm_put_u32(&b, 1, 1);
	sm_put_u64(&b, 2, 5);
	sm_put_bytes(&b, 4, "short", 5);
	CHECK(sm_msg_check(SM_HELLO, 1, b.data + SM_HDR_SIZE, b.len - SM_HDR_SIZE, err, sizeof err) < 0,
	      "HELLO entropy below 32 bytes rejected");
	sm_frame_begin(&b);
	sm_put_i32(&b, 1, 0);
	sm_put_u32(&b, 2, 9);
	CHECK(sm_msg_check(SM_EXIT, 0, b.data + SM_HDR_SIZE, b.len - SM_HDR_SIZE, err, sizeof err) < 0,
	      "EXIT with both exitCode and signal rejected");
	sm_frame_begin(&b);
	size_t m = sm_nested_begin(&b, 10);
	sm_put_u8(&b, 2, 1);
	sm_nested_end(&b, m);
	sm_put_str(&b, 1, "true");
	CHECK(sm_msg_check(SM_EXEC, 1, b.data + SM_HDR_SIZE, b.len - SM_HDR_SIZE, err, sizeof err) < 0,
	      "EXEC chain without argv rejected");
	sm_frame_begin(&b);
	sm_put_bytes(&b, 1, "a\0", 2);
	CHECK(sm_msg_check(SM_EXEC, 1, b.data + SM_HDR_SIZE, b.len - SM_HDR_SIZE, err, sizeof err) < 0,
	      "EXEC argv with a NUL rejected");
	CHECK(sm_msg_check(SM_WINDOW, 1, (const uint8_t *)"abc", 3, err, sizeof err) < 0, "3-byte WINDOW rejected");
	CHECK(sm_msg_check(SM_SHUTDOWN, 1, (const uint8_t *)"x", 1, err, sizeof err) < 0, "non-empty SHUTDOWN");
	CHECK(sm_msg_check(0x7f, 1, NULL, 0, err, sizeof err) < 0 && !sm_type_known(0x7f), "type 0x7f unknown");
	sm_buf_free(&b);
}

/* ------------------------------------------------------------------------------------------------
 * Golden fixtures.
 */

static char *slurp(const char *path)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fseek(f, 0, SEEK_SET);
	char *s = malloc((size_t)n + 1);
	size_t r = fread(s, 1, (size_t)n, f);
	s[r] = 0;
	fclose(f);
	return s;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9') return c - '0';
	if (c >= 'a' && c <= 'f') return c - 'a' + 10;
	if (c >= 'A' && c <= 'F') return c - 'A' + 10;
	return -1;
}

/* Hex text (whitespace and # comments ignored) to bytes; returns the length or -1. */
static long parse_hex(const char *s, uint8_t *out, size_t cap, int comments)
{
	size_t n = 0;
	int hi = -1;
	for (const char *p = s; *p; p++) {
		if (comments && *p == '#') {
			while (*p && *p != '\n')
				p++;
			if (!*p)
				break;
			continue;
		}
		if (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')
			continue;
		int v = hexval(*p);
		if (v < 0)
			return -1;
		if (hi < 0) {
			hi = v;
		} else {
			if (n == cap)
				return -1;
			out[n++] = (uint8_t)(hi << 4 | v);
			hi = -1;
		}
	}
	return hi < 0 ? (long)n : -1;
}

static int type_by_name(const char *name)
{
	if (!strncmp(name, "0x", 2))
		return (int)strtol(name, NULL, 16);
	for (int t = 0x40; t < 0x50; t++)
		if (sm_mount_type_name((unsigned)t) && !strcmp(sm_mount_type_name((unsigned)t), name))
			return t;
	for (int t = 0; t < 256; t++)
		if (!strcmp(sm_type_name((unsigned)t), name))
			return t;
	return -1;
}

static int kind_by_name(const char *k)
{
	static const char *names[] = { "u8", "u16", "u32", "u64", "i32", "string", "bytes", "nested" };
	for (int i = 0; i < 8; i++)
		if (!strcmp(names[i], k))
			return i;
	return -1;
}

static uint8_t hexbuf[SM_HDR_SIZE + SM_MAX_PAYLOAD + 16];
static uint8_t scratch[SM_MAX_PAYLOAD];

/* Compare decoded fields with the description. */
static void compare_fields(const uint8_t *p, size_t n, const struct jv *list, const char *where)
{
	struct sm_field *f = malloc(SM_MAX_FIELDS * sizeof *f);
	int k = sm_fields_split(p, n, f, SM_MAX_FIELDS);
	CHECK(k == (int)list->n, "%s: %d fields decoded, %zu described", where, k, list->n);
	for (int i = 0; i < k && i < (int)list->n; i++) {
		const struct jv *d = &list->items[i];
		const struct jv *tag = json_get(d, "tag"), *kind = json_get(d, "kind"), *val = json_get(d, "value");
		if (!tag || !kind || !val) {
			fail("%s: field %d description incomplete", where, i);
			continue;
		}
		CHECK(f[i].tag == atoi(tag->s), "%s: field %d tag %u, described %s", where, i, f[i].tag, tag->s);
		int kd = kind_by_name(kind->s);
		switch (kd) {
		case SM_K_U8: case SM_K_U16: case SM_K_U32: case SM_K_U64: {
			unsigned want = kd == SM_K_U8 ? 1 : kd == SM_K_U16 ? 2 : kd == SM_K_U32 ? 4 : 8;
			CHECK(f[i].len == want, "%s: field %d length %u for %s", where, i, f[i].len, kind->s);
			if (f[i].len == want)
				CHECK(sm_uval(&f[i]) == strtoull(val->s, NULL, 10), "%s: field %d value", where, i);
			break;
		}
		case SM_K_I32:
			CHECK(f[i].len == 4 && sm_ival(&f[i]) == (int32_t)strtoll(val->s, NULL, 10), "%s: field %d i32", where,
			      i);
			break;
		case SM_K_STRING:
			CHECK(f[i].len == val->len && !memcmp(f[i].val, val->s, val->len), "%s: field %d string", where, i);
			break;
		case SM_K_BYTES: {
			long bl = parse_hex(val->s, scratch, sizeof scratch, 0);
			CHECK(bl == (long)f[i].len && !memcmp(f[i].val, scratch, (size_t)bl), "%s: field %d bytes", where, i);
			break;
		}
		case SM_K_NESTED: {
			char sub[256];
			snprintf(sub, sizeof sub, "%s/field %d", where, i);
			compare_fields(f[i].val, f[i].len, val, sub);
			break;
		}
		default:
			fail("%s: field %d has unknown kind %s", where, i, kind->s);
		}
	}
	free(f);
}

static void encode_fields(struct sm_buf *b, const struct jv *list)
{
	for (size_t i = 0; i < list->n; i++) {
		const struct jv *d = &list->items[i];
		uint8_t tag = (uint8_t)atoi(json_get(d, "tag")->s);
		const struct jv *val = json_get(d, "value");
		switch (kind_by_name(json_get(d, "kind")->s)) {
		case SM_K_U8: sm_put_u8(b, tag, (uint8_t)strtoul(val->s, NULL, 10)); break;
		case SM_K_U16: sm_put_u16(b, tag, (uint16_t)strtoul(val->s, NULL, 10)); break;
		case SM_K_U32: sm_put_u32(b, tag, (uint32_t)strtoul(val->s, NULL, 10)); break;
		case SM_K_U64: sm_put_u64(b, tag, strtoull(val->s, NULL, 10)); break;
		case SM_K_I32: sm_put_i32(b, tag, (int32_t)strtol(val->s, NULL, 10)); break;
		case SM_K_STRING: sm_put_bytes(b, tag, val->s, val->len); break;
		case SM_K_BYTES: {
			long bl = parse_hex(val->s, scratch, sizeof scratch, 0);
			sm_put_bytes(b, tag, scratch, bl < 0 ? 0 : (size_t)bl);
			break;
		}
		case SM_K_NESTED: {
			size_t m = sm_nested_begin(b, tag);
			encode_fields(b, val);
			sm_nested_end(b, m);
			break;
		}
		default:
			break;
		}
	}
}

static int ends_with(const char *s, const char *suf)
{
	size_t a = strlen(s), b = strlen(suf);
	return a >= b && !strcmp(s + a - b, suf);
}

static void check_valid_fixture(const char *dir, const char *name)
{
	char path[1024], err[256];
	static char cur[300];
	snprintf(cur, sizeof cur, "fixture %s", name);
	current = cur;
	snprintf(path, sizeof path, "%s/%s.json", dir, name);
	char *text = slurp(path);
	struct jv *d = text ? json_parse(text, err, sizeof err) : NULL;
	if (!d) {
		fail("cannot read %s: %s", path, text ? err : strerror(errno));
		free(text);
		return;
	}
	snprintf(path, sizeof path, "%s/%s.hex", dir, name);
	char *hex = slurp(path);
	long n = hex ? parse_hex(hex, hexbuf, sizeof hexbuf, 1) : -1;
	if (n < (long)SM_HDR_SIZE) {
		fail("bad hex file %s", path);
		goto out;
	}
	const struct jv *from = json_get(d, "from"), *stream = json_get(d, "stream"), *type = json_get(d, "type"),
			*flags = json_get(d, "flags"), *fields = json_get(d, "fields"), *data = json_get(d, "data");
	int from_host = from && !strcmp(from->s, "host");
	int t = type ? type_by_name(type->s) : -1;
	struct sm_hdr h;
	CHECK(sm_hdr_decode(hexbuf, &h) == 0, "header decodes");
	CHECK(h.length == (uint32_t)(n - SM_HDR_SIZE), "length %u, payload %ld bytes", h.length, n - SM_HDR_SIZE);
	CHECK(stream && h.stream == strtoul(stream->s, NULL, 10), "stream");
	CHECK(t >= 0 && h.type == t, "type %s = 0x%02x", type ? type->s : "?", h.type);
	CHECK(flags && h.flags == strtoul(flags->s, NULL, 10), "flags");
	if (sm_mount_type_name(h.type)) { /* the mounts channel's own messages */
		CHECK(from_host ? sm_mount_type_from_host(h.type) : sm_mount_type_from_guest(h.type),
		      "type sent by this side");
		CHECK(sm_mount_msg_check(h.type, from_host, hexbuf + SM_HDR_SIZE, h.length, err, sizeof err) == 0,
		      "payload accepted by the schema: %s", err);
	} else {
		CHECK(from_host ? sm_type_from_host(h.type) : sm_type_from_guest(h.type), "type sent by this side");
		CHECK(sm_msg_check(h.type, from_host, hexbuf + SM_HDR_SIZE, h.length, err, sizeof err) == 0,
		      "payload accepted by the schema: %s", err);
	}
	if (fields)
		compare_fields(hexbuf + SM_HDR_SIZE, h.length, fields, "fields");
	if (data) {
		long dl = parse_hex(data->s, scratch, sizeof scratch, 0);
		CHECK(dl == (long)h.length && !memcmp(scratch, hexbuf + SM_HDR_SIZE, (size_t)dl), "raw payload");
	}
	CHECK(fields || data, "description has fields or data");
	/* re-encode from the description */
	struct sm_buf b = { 0 };
	sm_frame_begin(&b);
	if (fields)
		encode_fields(&b, fields);
	if (data) {
		long dl = parse_hex(data->s, scratch, sizeof scratch, 0);
		sm_buf_raw(&b, scratch, (size_t)(dl < 0 ? 0 : dl));
	}
	size_t len = sm_frame_end(&b, stream ? (uint32_t)strtoul(stream->s, NULL, 10) : 0, (uint8_t)t,
				  flags ? (uint8_t)strtoul(flags->s, NULL, 10) : 0);
	CHECK(len == (size_t)n && !memcmp(b.data, hexbuf, len), "re-encoding gives the same %ld bytes (got %zu)", n,
	      len);
	sm_buf_free(&b);
out:
	json_free(d);
	free(text);
	free(hex);
}

static void check_invalid_fixture(const char *dir, const char *name)
{
	char path[1024], err[256];
	static char cur[300];
	snprintf(cur, sizeof cur, "invalid fixture %s", name);
	current = cur;
	snprintf(path, sizeof path, "%s/invalid/%s.json", dir, name);
	char *text = slurp(path);
	struct jv *d = text ? json_parse(text, err, sizeof err) : NULL;
	snprintf(path, sizeof path, "%s/invalid/%s.hex", dir, name);
	char *hex = slurp(path);
	long n = hex ? parse_hex(hex, hexbuf, sizeof hexbuf, 1) : -1;
	if (!d || n < (long)SM_HDR_SIZE) {
		fail("cannot read the fixture");
		goto out;
	}
	const char *reject = json_get(d, "reject")->s;
	int from_host = !strcmp(json_get(d, "from")->s, "host");
	struct sm_hdr h;
	int hdr = sm_hdr_decode(hexbuf, &h);
	if (!strcmp(reject, "frame")) {
		CHECK(hdr < 0 || !sm_type_known(h.type), "the frame header is refused");
	} else {
		CHECK(hdr == 0 && h.length == (uint32_t)(n - SM_HDR_SIZE), "the header itself is fine");
		CHECK(hdr == 0 && sm_msg_check(h.type, from_host, hexbuf + SM_HDR_SIZE, h.length, err, sizeof err) < 0,
		      "the payload is refused (%s)", json_get(d, "why")->s);
	}
out:
	json_free(d);
	free(text);
	free(hex);
}

static int cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int list(const char *dir, char **names, int max)
{
	DIR *d = opendir(dir);
	if (!d)
		return -1;
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d)) && n < max) {
		if (ends_with(e->d_name, ".json")) {
			names[n] = strdup(e->d_name);
			names[n][strlen(names[n]) - 5] = 0;
			n++;
		}
	}
	closedir(d);
	qsort(names, (size_t)n, sizeof *names, cmp);
	return n;
}

int main(int argc, char **argv)
{
	test_header();
	test_fields();
	test_utf8();
	test_schemas();
	int nvalid = 0, ninvalid = 0;
	if (argc > 1) {
		static char *names[1024];
		char sub[1024];
		int n = list(argv[1], names, 1024);
		current = "fixtures";
		CHECK(n > 0, "no fixtures found in %s", argv[1]);
		for (int i = 0; i < n; i++, nvalid++)
			check_valid_fixture(argv[1], names[i]);
		snprintf(sub, sizeof sub, "%s/invalid", argv[1]);
		n = list(sub, names, 1024);
		for (int i = 0; i < n; i++, ninvalid++)
			check_invalid_fixture(argv[1], names[i]);
	}
	printf("test-proto: %d checks, %d failures (%d fixtures, %d invalid fixtures)\n", checks, failures, nvalid,
	       ninvalid);
	return failures ? 1 : 0;
}
