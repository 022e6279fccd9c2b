/* Coverage-guided fuzz target (libFuzzer) for the agent's decoder: the input is a byte stream from
 * the host, read frame by frame exactly as the agent reads its channel (header, bounded length,
 * field sequence checked against each message type's spec). Nothing it contains may crash, hang,
 * read out of bounds or allocate without bound; AddressSanitizer and UBSan watch every access.
 *   make fuzz            builds build/fuzz-proto (clang-14)
 *   make fuzz-run SECONDS=N   runs it N seconds on a corpus seeded from the golden fixtures */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "mount.h"
#include "proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct sm_field fields[SM_MAX_FIELDS];
	char err[256];
	size_t off = 0;
	while (size - off >= SM_HDR_SIZE) {
		struct sm_hdr h;
		if (sm_hdr_decode(data + off, &h) != 0)
			return 0; /* a bad header ends the channel, as in the agent */
		off += SM_HDR_SIZE;
		size_t n = h.length;
		if (n > size - off)
			return 0; /* a frame cut off by the end of input */
		const uint8_t *p = data + off;
		off += n;
		/* Both directions: the agent checks what the host sends, the tests what the agent sends. */
		(void)sm_msg_check(h.type, 1, p, n, err, sizeof err);
		(void)sm_msg_check(h.type, 0, p, n, err, sizeof err);
		/* And the mount relay's channel (docs/protocol.md, "Mounts channel"). */
		(void)sm_mount_msg_check(h.type, 1, p, n, err, sizeof err);
		int nf = sm_fields_split(p, n, fields, SM_MAX_FIELDS);
		for (int i = 0; i < nf; i++) {
			if (fields[i].len > n)
				__builtin_trap(); /* a field that claims more than its frame */
			(void)sm_utf8_valid(fields[i].val, fields[i].len);
		}
	}
	return 0;
}
