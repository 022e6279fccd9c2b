/* The guest's end of QEMU's user-mode network (docs/network.md). With sm.net=user, eth0 gets
 * 10.0.2.15/24 and a default route via 10.0.2.2 (the host side of QEMU's network), set statically:
 * the guest kernel has no AF_PACKET, so no DHCP client could run. Which destinations answer is
 * decided on the host, never here. The host writes /etc/resolv.conf and /etc/hosts through the
 * agent (src/vm/guest-network.ts). */
#define _GNU_SOURCE
#include "net.h"
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NET_IF "eth0"
#define NET_ADDRESS "10.0.2.15"
#define NET_MASK "255.255.255.0"
#define NET_GATEWAY "10.0.2.2"
/* The device is probed before init runs; allow a little time anyway. */
#define WAIT_IF_MS 2000

static void set_sin(struct sockaddr *sa, const char *ip)
{
	struct sockaddr_in *sin = (struct sockaddr_in *)sa;
	memset(sin, 0, sizeof *sin);
	sin->sin_family = AF_INET;
	inet_pton(AF_INET, ip, &sin->sin_addr);
}

static int if_ioctl(int s, unsigned long request, const char *ip, const char *what)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	memcpy(ifr.ifr_name, NET_IF, sizeof NET_IF);
	set_sin(&ifr.ifr_addr, ip);
	if (ioctl(s, request, &ifr) < 0) {
		sm_log("network: %s %s on %s: %s", what, ip, NET_IF, strerror(errno));
		return -1;
	}
	return 0;
}

void sm_net_setup(const char *mode)
{
	if (strcmp(mode, "user") != 0) {
		sm_log("network: unknown sm.net=%s ignored", mode);
		return;
	}
	for (int waited = 0; !if_nametoindex(NET_IF); waited += 10) {
		if (waited >= WAIT_IF_MS) {
			sm_log("network: %s did not appear within %d ms", NET_IF, WAIT_IF_MS);
			return;
		}
		struct timespec ts = { 0, 10 * 1000000 };
		nanosleep(&ts, NULL);
	}
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		sm_log("network: socket: %s", strerror(errno));
		return;
	}
	if (if_ioctl(s, SIOCSIFADDR, NET_ADDRESS, "address") < 0 ||
	    if_ioctl(s, SIOCSIFNETMASK, NET_MASK, "netmask") < 0)
		goto out;
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	memcpy(ifr.ifr_name, NET_IF, sizeof NET_IF);
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) {
		sm_log("network: flags of %s: %s", NET_IF, strerror(errno));
		goto out;
	}
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) {
		sm_log("network: bringing %s up: %s", NET_IF, strerror(errno));
		goto out;
	}
	struct rtentry rt;
	memset(&rt, 0, sizeof rt);
	set_sin(&rt.rt_dst, "0.0.0.0");
	set_sin(&rt.rt_genmask, "0.0.0.0");
	set_sin(&rt.rt_gateway, NET_GATEWAY);
	rt.rt_flags = RTF_UP | RTF_GATEWAY;
	rt.rt_dev = (char *)NET_IF;
	if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST)
		sm_log("network: default route via %s: %s", NET_GATEWAY, strerror(errno));
	else
		sm_dbg("network: %s %s/24 via %s", NET_IF, NET_ADDRESS, NET_GATEWAY);
out:
	close(s);
}
