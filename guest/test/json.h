/* A small JSON reader for the golden fixtures (test code only). */
#ifndef SM_TEST_JSON_H
#define SM_TEST_JSON_H
#include <stddef.h>

enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };

struct jv {
	int type;
	int b;
	char *s;     /* J_STR: UTF-8 (may contain NUL, see len); J_NUM: the number's text */
	size_t len;  /* J_STR length */
	size_t n;    /* J_ARR / J_OBJ entries */
	struct jv *items;
	char **keys; /* J_OBJ */
};

/* Parse; returns NULL on a syntax error (err gets a message). */
struct jv *json_parse(const char *text, char *err, size_t errlen);
struct jv *json_get(const struct jv *obj, const char *key);
void json_free(struct jv *v);
#endif
