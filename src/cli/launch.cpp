// `flora train --nproc N`: starts N local workers of the same command with torchrun's
// environment variables and supervises them: the first worker that fails stops the others, so no
// worker waits forever on a dead peer.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "commands.h"
#include "flora/spec.h"

extern char** environ;

namespace flora {
namespace cli {
namespace {

volatile sig_atomic_t g_signal = 0;
void on_signal(int sig) { g_signal = sig; }

// A TCP port that was free a moment ago on the loopback interface.
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw Error("--nproc: cannot open a socket to find a free port: " + std::string(std::strerror(errno)));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0;
  ::close(fd);
  if (!ok) throw Error("--nproc: cannot bind a loopback port: " + std::string(std::strerror(errno)) + " (hint: set MASTER_PORT)");
  return ntohs(a.sin_port);
}

std::string describe_status(int status) {
  if (WIFSIGNALED(status)) return "was killed by signal " + std::to_string(WTERMSIG(status)) + " (" + strsignal(WTERMSIG(status)) + ")";
  return "exited with code " + std::to_string(WEXITSTATUS(status));
}

int exit_code(int status) { return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status); }

}  // namespace

int launch_local_workers(int nproc, const std::vector<std::string>& worker_args, int threads_per_worker) {
  if (nproc < 1) throw InvalidArgument("--nproc " + std::to_string(nproc) + " is invalid (expected >= 1)");
  if (std::getenv("RANK") || std::getenv("WORLD_SIZE"))
    throw InvalidArgument("--nproc " + std::to_string(nproc) + " inside a launched job (RANK/WORLD_SIZE are set) (hint: let torchrun or srun start the processes, or drop --nproc)");
  const std::string exe = std::filesystem::read_symlink("/proc/self/exe").string();
  const char* port_env = std::getenv("MASTER_PORT");
  const std::string port = port_env ? port_env : std::to_string(free_port());
  const char* addr_env = std::getenv("MASTER_ADDR");
  const std::string addr = addr_env ? addr_env : "127.0.0.1";

  struct sigaction sa {}, old_int {}, old_term {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);
  g_signal = 0;

  std::vector<pid_t> pids(static_cast<size_t>(nproc), 0);
  std::vector<int> status(static_cast<size_t>(nproc), -1);
  std::vector<bool> forced(static_cast<size_t>(nproc), false);
  for (int r = 0; r < nproc; ++r) {
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) {
      const std::string kv(*e);
      const std::string key = kv.substr(0, kv.find('='));
      if (key != "OMP_NUM_THREADS" && key != "MASTER_ADDR" && key != "MASTER_PORT") env.push_back(kv);
    }
    for (const auto& kv : {"RANK=" + std::to_string(r), "LOCAL_RANK=" + std::to_string(r), "WORLD_SIZE=" + std::to_string(nproc),
                           "LOCAL_WORLD_SIZE=" + std::to_string(nproc), "MASTER_ADDR=" + addr, "MASTER_PORT=" + port,
                           "OMP_NUM_THREADS=" + std::to_string(threads_per_worker)})
      env.push_back(kv);
    std::vector<std::string> args{exe};
    args.insert(args.end(), worker_args.begin(), worker_args.end());
    std::vector<char*> argv, envp;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    for (auto& kv : env) envp.push_back(kv.data());
    envp.push_back(nullptr);
    const int err = posix_spawn(&pids[r], exe.c_str(), nullptr, nullptr, argv.data(), envp.data());
    if (err != 0) {
      for (int k = 0; k < r; ++k) ::kill(pids[k], SIGKILL);
      throw Error("--nproc: cannot start worker " + std::to_string(r) + " ('" + exe + "'): " + std::strerror(err));
    }
  }
  std::cerr << "flora: started " << nproc << " workers (MASTER_ADDR=" << addr << " MASTER_PORT=" << port << ", "
            << threads_per_worker << " thread(s) each)\n";

  int running = nproc, first_failure = -1, forwarded = 0;
  auto stop_time = std::chrono::steady_clock::time_point::max();
  while (running > 0) {
    int st = 0;
    const pid_t pid = ::waitpid(-1, &st, WNOHANG);
    if (pid > 0) {
      for (int r = 0; r < nproc; ++r)
        if (pids[r] == pid) {
          status[r] = st;
          --running;
          const bool failed = exit_code(st) != 0 && exit_code(st) != 130;  // 130: stopped together, checkpoint saved
          if (failed && first_failure < 0) {
            first_failure = r;
            if (running > 0) {
              std::cerr << "flora: worker " << r << " of " << nproc << " (pid " << pid << ") " << describe_status(st)
                        << "; stopping the other workers\n";
              for (int k = 0; k < nproc; ++k)
                if (status[k] == -1) ::kill(pids[k], SIGTERM), ::kill(pids[k], SIGCONT);
              stop_time = std::chrono::steady_clock::now() + std::chrono::seconds(10);
            }
          }
        }
      continue;
    }
    if (pid < 0 && errno != EINTR && errno != ECHILD) break;
    if (g_signal && forwarded != g_signal) {  // let the workers checkpoint and exit 130 together
      forwarded = g_signal;
      for (int k = 0; k < nproc; ++k)
        if (status[k] == -1) ::kill(pids[k], forwarded);
    }
    if (std::chrono::steady_clock::now() > stop_time) {  // a worker ignored SIGTERM (hung): force it
      for (int k = 0; k < nproc; ++k)
        if (status[k] == -1) ::kill(pids[k], SIGKILL), forced[k] = true;
      stop_time = std::chrono::steady_clock::time_point::max();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);
  if (first_failure >= 0) {
    for (int r = 0; r < nproc; ++r)
      if (r != first_failure)
        std::cerr << "flora: worker " << r << " " << (forced[r] ? "did not stop within 10 s and was killed" : describe_status(status[r])) << "\n";
    std::cerr << "flora: error: data-parallel job failed: worker " << first_failure << " of " << nproc << " "
              << describe_status(status[first_failure]) << " (hint: its error is printed above)\n";
    return exit_code(status[first_failure]);
  }
  for (int r = 0; r < nproc; ++r)
    if (exit_code(status[r]) != 0) return exit_code(status[r]);
  return 0;
}

}  // namespace cli
}  // namespace flora
