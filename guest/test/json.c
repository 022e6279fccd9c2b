#include "json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct P {
	const char *p;
	const char *err;
};

static void ws(struct P *x)
{
	while (*x->p == ' ' || *x->p == '\n' || *x->p == '\r' || *x->p == '\t')
		x->p++;
}

static int value(struct P *x, struct jv *v);

static void put_utf8(char *out, size_t *n, unsigned cp)
{
	if (cp < 0x80) {
		out[(*n)++] = (char)cp;
	} else if (cp < 0x800) {
		out[(*n)++] = (char)(0xc0 | (cp >> 6));
		out[(*n)++] = (char)(0x80 | (cp & 0x3f));
	} else if (cp < 0x10000) {
		out[(*n)++] = (char)(0xe0 | (cp >> 12));
		out[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3f));
		out[(*n)++] = (char)(0x80 | (cp & 0x3f));
	} else {
		out[(*n)++] = (char)(0xf0 | (cp >> 18));
		out[(*n)++] = (char)(0x80 | ((cp >> 12) & 0x3f));
		out[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3f));
		out[(*n)++] = (char)(0x80 | (cp & 0x3f));
	}
}

static int hex4(const char *p, unsigned *out)
{
	unsigned v = 0;
	for (int i = 0; i < 4; i++) {
		char c = p[i];
		v <<= 4;
		if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
		else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
		else return -1;
	}
	*out = v;
	return 0;
}

static int string(struct P *x, char **out, size_t *outlen)
{
	if (*x->p != '"') {
		x->err = "expected a string";
		return -1;
	}
	x->p++;
	const char *start = x->p;
	size_t cap = 16;
	while (*x->p && *x->p != '"') {
		if (*x->p == '\\' && x->p[1])
			x->p++;
		x->p++;
		cap++;
	}
	if (*x->p != '"') {
		x->err = "unterminated string";
		return -1;
	}
	char *s = malloc(cap * 4);
	size_t n = 0;
	for (const char *p = start; p < x->p; p++) {
		if (*p != '\\') {
			s[n++] = *p;
			continue;
		}
		p++;
		switch (*p) {
		case 'n': s[n++] = '\n'; break;
		case 't': s[n++] = '\t'; break;
		case 'r': s[n++] = '\r'; break;
		case 'b': s[n++] = '\b'; break;
		case 'f': s[n++] = '\f'; break;
		case 'u': {
			unsigned cp, lo;
			if (hex4(p + 1, &cp)) {
				free(s);
				x->err = "bad \\u escape";
				return -1;
			}
			p += 4;
			if (cp >= 0xd800 && cp < 0xdc00 && p[1] == '\\' && p[2] == 'u' && hex4(p + 3, &lo) == 0 &&
			    lo >= 0xdc00 && lo < 0xe000) {
				cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
				p += 6;
			}
			put_utf8(s, &n, cp);
			break;
		}
		default: s[n++] = *p; break;
		}
	}
	s[n] = 0;
	x->p++;
	*out = s;
	*outlen = n;
	return 0;
}

static int value(struct P *x, struct jv *v)
{
	memset(v, 0, sizeof *v);
	ws(x);
	char c = *x->p;
	if (c == '{' || c == '[') {
		int obj = c == '{';
		v->type = obj ? J_OBJ : J_ARR;
		x->p++;
		size_t cap = 0;
		ws(x);
		if (*x->p == (obj ? '}' : ']')) {
			x->p++;
			return 0;
		}
		for (;;) {
			if (v->n == cap) {
				cap = cap ? cap * 2 : 8;
				v->items = realloc(v->items, cap * sizeof *v->items);
				if (obj)
					v->keys = realloc(v->keys, cap * sizeof *v->keys);
			}
			ws(x);
			if (obj) {
				size_t kl;
				if (string(x, &v->keys[v->n], &kl))
					return -1;
				ws(x);
				if (*x->p != ':') {
					x->err = "expected ':'";
					return -1;
				}
				x->p++;
			}
			if (value(x, &v->items[v->n]))
				return -1;
			v->n++;
			ws(x);
			if (*x->p == ',') {
				x->p++;
				continue;
			}
			if (*x->p == (obj ? '}' : ']')) {
				x->p++;
				return 0;
			}
			x->err = "expected ',' or a closing bracket";
			return -1;
		}
	}
	if (c == '"') {
		v->type = J_STR;
		return string(x, &v->s, &v->len);
	}
	if (!strncmp(x->p, "true", 4) || !strncmp(x->p, "false", 5)) {
		v->type = J_BOOL;
		v->b = c == 't';
		x->p += v->b ? 4 : 5;
		return 0;
	}
	if (!strncmp(x->p, "null", 4)) {
		v->type = J_NULL;
		x->p += 4;
		return 0;
	}
	if (c == '-' || (c >= '0' && c <= '9')) {
		const char *s = x->p;
		while (*x->p == '-' || *x->p == '+' || *x->p == '.' || *x->p == 'e' || *x->p == 'E' ||
		       (*x->p >= '0' && *x->p <= '9'))
			x->p++;
		v->type = J_NUM;
		v->s = strndup(s, (size_t)(x->p - s));
		return 0;
	}
	x->err = "unexpected character";
	return -1;
}

struct jv *json_parse(const char *text, char *err, size_t errlen)
{
	struct P x = { text, NULL };
	struct jv *v = malloc(sizeof *v);
	if (value(&x, v) == 0) {
		ws(&x);
		if (!*x.p)
			return v;
		x.err = "trailing characters";
	}
	snprintf(err, errlen, "%s at offset %zu", x.err, (size_t)(x.p - text));
	return NULL;
}

struct jv *json_get(const struct jv *obj, const char *key)
{
	if (!obj || obj->type != J_OBJ)
		return NULL;
	for (size_t i = 0; i < obj->n; i++)
		if (!strcmp(obj->keys[i], key))
			return &obj->items[i];
	return NULL;
}

static void free_inner(struct jv *v)
{
	for (size_t i = 0; i < v->n; i++) {
		free_inner(&v->items[i]);
		if (v->keys)
			free(v->keys[i]);
	}
	free(v->items);
	free(v->keys);
	free(v->s);
}

void json_free(struct jv *v)
{
	if (!v)
		return;
	free_inner(v);
	free(v);
}
