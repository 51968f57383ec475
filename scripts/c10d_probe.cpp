// Feasibility probe for data-parallel training (issue: libtorch process
// groups): libtorch's own TCPStore and ProcessGroupGloo from C++, two ranks
// (fork) all-reducing a tensor on 127.0.0.1. Needs Debian's libgloo-dev for the
// gloo headers ProcessGroupGloo.hpp includes, and USE_C10D_GLOO defined:
//   g++ -std=c++17 -DUSE_C10D_GLOO -D_GLIBCXX_USE_CXX11_ABI=1 -I.libtorch/include \
//     -I.libtorch/include/torch/csrc/api/include scripts/c10d_probe.cpp -o /tmp/probe \
//     -L.libtorch/lib -Wl,-rpath,$PWD/.libtorch/lib -ltorch -ltorch_cpu -lc10 && /tmp/probe
// prints a tensor of 3s from each rank (1 + 2) with torch 2.13.
#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <unistd.h>
#include <sys/wait.h>
#include <iostream>

int run(int rank, int world) {
  c10d::TCPStoreOptions o;
  o.port = 29531; o.isServer = rank == 0; o.numWorkers = world; o.waitWorkers = true;
  o.timeout = std::chrono::milliseconds(10000);
  auto store = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", o);
  auto opts = c10d::ProcessGroupGloo::Options::create();
  opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
  std::vector<at::Tensor> t = {torch::full({4}, (float)(rank + 1))};
  pg->allreduce(t)->wait();
  std::cout << "rank " << rank << ": " << t[0] << std::endl;
  return 0;
}
int main() {
  pid_t p = fork();
  if (p == 0) return run(1, 2);
  run(0, 2);
  int st; waitpid(p, &st, 0);
  return 0;
}
