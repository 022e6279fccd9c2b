/* Message types and payload schemas of the mounts channel (docs/protocol.md, "Mounts channel").
 * Pure: no I/O. HELLO, ERROR, WINDOW, OK, RESET, PING and PONG have the agent channel's layouts. */
#include "mount.h"
#include "proto.h"

#include <stdio.h>
#include <string.h>

const char *sm_mount_type_name(unsigned type)
{
	switch (type) {
	case SM_MOUNT: return "MOUNT";
	case SM_MOUNTED: return "MOUNTED";
	case SM_MOUNT_DATA: return "MOUNT_DATA";
	case SM_UNMOUNT: return "UNMOUNT";
	default: return NULL;
	}
}

int sm_mount_type_from_host(unsigned type)
{
	return type == SM_MOUNT || type == SM_MOUNT_DATA || type == SM_UNMOUNT || type == SM_HELLO || type == SM_PING ||
	       type == SM_RESET || type == SM_WINDOW;
}

int sm_mount_type_from_guest(unsigned type)
{
	return type == SM_MOUNTED || type == SM_MOUNT_DATA || type == SM_HELLO || type == SM_PONG || type == SM_ERROR ||
	       type == SM_WINDOW || type == SM_OK;
}

static struct sm_field fields[SM_MAX_FIELDS];

int sm_mount_msg_check(unsigned type, int from_host, const uint8_t *p, size_t n, char *err, size_t errlen)
{
	static const struct sm_spec mount_spec[] = {
		{ 1, SM_K_STRING, SM_REQ }, { 2, SM_K_U32, 0 }, { 3, SM_K_U8, 0 }, { 4, SM_K_U32, 0 }, { 5, SM_K_STRING, 0 },
	};
	if (from_host ? !sm_mount_type_from_host(type) : !sm_mount_type_from_guest(type)) {
		snprintf(err, errlen, "type 0x%02x is not sent by the %s on the mounts channel", type,
			 from_host ? "host" : "guest");
		return -1;
	}
	switch (type) {
	case SM_MOUNT: {
		int k = sm_fields_split(p, n, fields, SM_MAX_FIELDS);
		if (k < 0) {
			snprintf(err, errlen, "malformed fields");
			return -1;
		}
		return sm_fields_check(fields, k, mount_spec, sizeof mount_spec / sizeof mount_spec[0], err, errlen);
	}
	case SM_MOUNTED: {
		int k = sm_fields_split(p, n, fields, SM_MAX_FIELDS);
		if (k < 0) {
			snprintf(err, errlen, "malformed fields");
			return -1;
		}
		return 0;
	}
	case SM_MOUNT_DATA:
		return 0;
	case SM_UNMOUNT:
		if (n) {
			snprintf(err, errlen, "UNMOUNT payload must be empty");
			return -1;
		}
		return 0;
	default:
		return sm_msg_check(type, from_host, p, n, err, errlen);
	}
}
