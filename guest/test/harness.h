/* The test harness shared by the agent tests (harness.c). */
#ifndef SM_TEST_HARNESS_H
#define SM_TEST_HARNESS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "proto.h"

extern const char *agent_bin;
extern int failures, checks;
extern const char *current; /* the test running, for messages */
extern char tmpdir[256];

void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#define CHECK(cond, ...)                                                                                              \
	do {                                                                                                          \
		checks++;                                                                                             \
		if (!(cond))                                                                                          \
			fail(__VA_ARGS__);                                                                            \
	} while (0)

int64_t now_ms(void);

struct agent {
	pid_t pid;
	int fd;
	uint8_t *buf;
	size_t len;
	size_t consumed; /* bytes of the frame last returned, dropped on the next receive */
	uint32_t next_id;
};

struct frame {
	struct sm_hdr h;
	uint8_t *p;
	struct sm_field f[64];
	int nf;
};

void start(struct agent *a);
/* Close the channel and return the agent's exit status. */
int stop(struct agent *a);
void send_raw(struct agent *a, const void *p, size_t n);
void send_frame(struct agent *a, uint32_t stream, uint8_t type, uint8_t flags, const void *p, size_t n);
void send_buf(struct agent *a, struct sm_buf *b, uint32_t stream, uint8_t type);
void send_window(struct agent *a, uint32_t stream, uint32_t n);
/* Receive one frame: 0, or -1 on timeout, -2 on EOF. The payload stays valid until the next call. */
int recv_frame(struct agent *a, struct frame *f, int timeout_ms);
uint64_t fu(const struct frame *f, uint8_t tag, uint64_t dflt);
int fstr(const struct frame *f, uint8_t tag, char *out, size_t cap);
/* Expect the next frame to be of `type` on `stream`. */
int expect(struct agent *a, struct frame *f, uint32_t stream, uint8_t type, int timeout_ms);
void hello(struct agent *a, uint64_t epoch);
/* Is the process gone (or a zombie)? Waits up to ms. */
int process_gone(pid_t pid, int ms);

/* test_streams.c: TCP tunnels, file-system operations, watches, the workload */
void test_tcp(struct agent *a);
void test_fs(struct agent *a);
void test_watch(struct agent *a);
void test_workload(void);

#endif
