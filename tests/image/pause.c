/* The pod sandbox's process (what Kubernetes' pause image runs): PID 1 of the pod's
 * namespaces, it holds them open, reaps the zombies a shared PID namespace hands it, and
 * exits 0 on SIGTERM or SIGINT (as PID 1 it gets only the signals it handles). */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
  (void)sig;
  _exit(0);
}

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, 0, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction sa = {0};
  sa.sa_handler = stop;
  sigaction(SIGTERM, &sa, 0);
  sigaction(SIGINT, &sa, 0);
  sa.sa_handler = reap;
  sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  sigaction(SIGCHLD, &sa, 0);
  for (;;)
    pause();
}
