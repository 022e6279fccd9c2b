/* Frame and field codec of the host-guest protocol (docs/protocol.md). Pure: no I/O. */
#ifndef SM_PROTO_H
#define SM_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define SM_PROTO_VERSION 2u
#define SM_HDR_SIZE 10u
#define SM_MAX_PAYLOAD (1u << 20)
#define SM_MAX_FIELDS 8192u
#define SM_FLAG_FIN 0x01u
/* Credit a guest->host data frame costs beyond its payload (docs/protocol.md, "Credit"); an empty
 * frame with FIN is free. */
#define SM_FRAME_COST 64u

enum sm_type {
	SM_HELLO = 0x01,
	SM_PING = 0x02,
	SM_PONG = 0x03,
	SM_SHUTDOWN = 0x04,
	SM_ERROR = 0x05,
	SM_RESET = 0x06,
	SM_EXEC = 0x10,
	SM_STAGE_DATA = 0x11,
	SM_STDIN = 0x12,
	SM_STDOUT = 0x13,
	SM_STDERR = 0x14,
	SM_WINDOW = 0x15,
	SM_RESIZE = 0x16,
	SM_SIGNAL = 0x17,
	SM_STARTED = 0x18,
	SM_EXIT = 0x19,
	/* the workload */
	SM_WORKLOAD_START = 0x1a,
	SM_WORKLOAD_QUERY = 0x1b,
	SM_WORKLOAD_SIGNAL = 0x1c,
	SM_WORKLOAD_LOGS = 0x1d,
	SM_WORKLOAD_STATUS = 0x1e,
	SM_FREEZE = 0x1f,
	SM_WRITE_FILE = 0x20,
	SM_READ_FILE = 0x21,
	SM_FILE_DATA = 0x22,
	SM_FILE_INFO = 0x23,
	SM_OK = 0x24,
	/* file-system operations and watches */
	SM_FS = 0x25,
	SM_STAT = 0x26,
	SM_DIRENTS = 0x27,
	SM_WATCH = 0x28,
	SM_WATCH_EVENT = 0x29,
	/* TCP tunnels */
	SM_TCP_CONNECT = 0x30,
	SM_TCP_CONNECTED = 0x31,
	SM_TCP_DATA = 0x32,
};

enum sm_errcode {
	SM_E_UNSUPPORTED = 1,
	SM_E_BAD_REQUEST = 2,
	SM_E_NOT_FOUND = 3,
	SM_E_START_FAILED = 4,
	SM_E_IO = 5,
	SM_E_VERSION = 6,
	SM_E_BAD_FRAME = 7,
};

/* Field value kinds. */
enum sm_kind { SM_K_U8, SM_K_U16, SM_K_U32, SM_K_U64, SM_K_I32, SM_K_STRING, SM_K_BYTES, SM_K_NESTED };

struct sm_hdr {
	uint32_t length;
	uint32_t stream;
	uint8_t type;
	uint8_t flags;
};

/* Header codec. decode returns 0, or -1 if length > SM_MAX_PAYLOAD or reserved flag bits are set. */
void sm_hdr_encode(uint8_t out[SM_HDR_SIZE], const struct sm_hdr *h);
int sm_hdr_decode(const uint8_t in[SM_HDR_SIZE], struct sm_hdr *h);
const char *sm_type_name(unsigned type);

static inline uint16_t sm_be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t sm_be32(const uint8_t *p)
{
	return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t sm_be64(const uint8_t *p) { return ((uint64_t)sm_be32(p) << 32) | sm_be32(p + 4); }
static inline void sm_put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void sm_put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static inline void sm_put64(uint8_t *p, uint64_t v) { sm_put32(p, (uint32_t)(v >> 32)); sm_put32(p + 4, (uint32_t)v); }

/* ---- Encoding: a growable buffer holding a whole frame (header reserved up front). ---- */
struct sm_buf {
	uint8_t *data;
	size_t len;
	size_t cap;
	int oom; /* set when an allocation failed or MAX_PAYLOAD was exceeded; the frame is invalid */
};

/* Start a frame: resets the buffer and reserves the header. */
void sm_frame_begin(struct sm_buf *b);
/* Finish the frame: fills in the header; returns the total frame size, or 0 on error. */
size_t sm_frame_end(struct sm_buf *b, uint32_t stream, uint8_t type, uint8_t flags);
void sm_buf_free(struct sm_buf *b);
void sm_buf_raw(struct sm_buf *b, const void *p, size_t n);
void sm_put_u8(struct sm_buf *b, uint8_t tag, uint8_t v);
void sm_put_u16(struct sm_buf *b, uint8_t tag, uint16_t v);
void sm_put_u32(struct sm_buf *b, uint8_t tag, uint32_t v);
void sm_put_u64(struct sm_buf *b, uint8_t tag, uint64_t v);
void sm_put_i32(struct sm_buf *b, uint8_t tag, int32_t v);
void sm_put_bytes(struct sm_buf *b, uint8_t tag, const void *p, size_t n);
void sm_put_str(struct sm_buf *b, uint8_t tag, const char *s);
/* Nested field: begin returns a mark to pass to end. */
size_t sm_nested_begin(struct sm_buf *b, uint8_t tag);
void sm_nested_end(struct sm_buf *b, size_t mark);

/* ---- Decoding ---- */
struct sm_field {
	uint8_t tag;
	uint32_t len;
	const uint8_t *val;
};

/* Split a field sequence. Returns the number of fields, or -1 if it is truncated or has more than
 * `max` (at most SM_MAX_FIELDS) fields. */
int sm_fields_split(const uint8_t *p, size_t n, struct sm_field *out, size_t max);

#define SM_REQ 1u
#define SM_REP 2u
struct sm_spec {
	uint8_t tag;
	uint8_t kind;
	uint8_t flags; /* SM_REQ, SM_REP */
};

/* Check fields against a schema: kinds and sizes of known tags, strings (UTF-8, no NUL), nested
 * values (a valid field sequence of at most SM_MAX_FIELDS), required fields present, non-repeated
 * fields at most once. Unknown tags are ignored. Returns 0 or -1 with a message in err. */
int sm_fields_check(const struct sm_field *f, int n, const struct sm_spec *spec, size_t nspec, char *err,
		    size_t errlen);

const struct sm_field *sm_find(const struct sm_field *f, int n, uint8_t tag);
/* Value getters for a field known to be valid (after sm_fields_check). */
uint64_t sm_uval(const struct sm_field *f); /* u8/u16/u32/u64 by length */
int32_t sm_ival(const struct sm_field *f);
/* Getters with defaults. */
uint64_t sm_get_u(const struct sm_field *f, int n, uint8_t tag, uint64_t dflt);
int sm_utf8_valid(const uint8_t *p, size_t n);
/* HELLO's identity fields: 32 lowercase hex digits; 1-64 of [A-Za-z0-9.-], not starting with - or . */
int sm_machine_id_valid(const uint8_t *p, size_t n);
int sm_hostname_valid(const uint8_t *p, size_t n);

/* Is `type` a message type of this protocol version? */
int sm_type_known(unsigned type);
/* Is `type` sent by the host (1), by the guest (0), or both (HELLO, WINDOW, FILE_DATA)? */
int sm_type_from_host(unsigned type);
int sm_type_from_guest(unsigned type);
/* Does `type` open a new stream (EXEC, WRITE_FILE, READ_FILE, FS, WATCH, TCP_CONNECT, WORKLOAD_*)? */
int sm_type_opens_stream(unsigned type);
/* May `type` carry FIN (host->guest data messages)? */
int sm_type_takes_fin(unsigned type);
/* Validate a whole message payload as sent by the host (from_host = 1) or the guest: field kinds
 * and sizes, required and non-repeated fields, nested sequences, raw-payload limits. Returns 0, or
 * -1 with a message in err. */
int sm_msg_check(unsigned type, int from_host, const uint8_t *p, size_t n, char *err, size_t errlen);

#endif
