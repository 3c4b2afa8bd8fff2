/*
 * LD_PRELOAD shim for benchmarks: sets TCP_NODELAY on every socket the
 * process accepts. For S3 test servers (s3s-fs) that write an answer's
 * headers and its body in two writes without it: the body then waits
 * for the client's delayed ACK of the headers (40 ms on Linux) under
 * Nagle's algorithm, which production S3 services do not impose.
 * Built and used by scripts/bench-clone-s3 (S3_NODELAY=1).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static int nodelay(int fd)
{
	int one = 1;

	if (fd >= 0)
		(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
	static int (*real)(int, struct sockaddr *, socklen_t *, int);

	if (!real)
		real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
	return nodelay(real(fd, addr, len, flags));
}

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
	static int (*real)(int, struct sockaddr *, socklen_t *);

	if (!real)
		real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
	return nodelay(real(fd, addr, len));
}
