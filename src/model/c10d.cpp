// libtorch's own distributed backend for Rust: a TCPStore rendezvous, a
// ProcessGroupGloo (the group PyTorch's DDP uses on CPU) and, where built
// with GENECIS_NCCL, a ProcessGroupNCCL for CUDA tensors (PyTorch's
// "cpu:gloo,cuda:nccl"), with the collectives data-parallel training
// needs, on tch tensors (torch-sys passes at::Tensor pointers). tch
// exposes nothing distributed (tch-rs#936); build.rs compiles this with
// USE_C10D_GLOO against the wheel's headers and Debian's gloo headers
// (libgloo-dev), adding USE_C10D_NCCL with the nvidia-nccl and CUDA
// wheels' headers when libtorch_cuda is there; the implementations are
// the wheel's libtorch_cpu and libtorch_cuda.
#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#ifdef GENECIS_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

struct gc_pg {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> gloo;
  // Null unless built with NCCL and a CUDA device is present.
  c10::intrusive_ptr<c10d::Backend> nccl;
  int rank;
  int world;
  // The backend for a tensor: NCCL for CUDA tensors where there is one.
  c10d::Backend &pg(const at::Tensor &t) {
    return (t.is_cuda() && nccl) ? *nccl : *gloo;
  }
};

// 1 when this build can run NCCL collectives.
extern "C" int gc_has_nccl() {
#ifdef GENECIS_NCCL
  return 1;
#else
  return 0;
#endif
}

static void set_err(char *err, int len, const std::string &m) {
  if (err && len > 0) {
    std::strncpy(err, m.c_str(), len - 1);
    err[len - 1] = 0;
  }
}

#define GC_TRY(body)                 \
  try {                              \
    body;                            \
    return 0;                        \
  } catch (const std::exception &e) { \
    set_err(err, errlen, e.what());  \
    return -1;                       \
  }

extern "C" {

// Rank 0 serves the store at addr:port; every rank waits for the others
// up to timeout_ms, then joins the Gloo group over `iface_addr`.
gc_pg *gc_init(const char *addr, int port, int rank, int world, int timeout_ms, char *err, int errlen) {
  try {
    c10d::TCPStoreOptions o;
    o.port = static_cast<uint16_t>(port);
    o.isServer = rank == 0;
    o.numWorkers = world;
    o.waitWorkers = true;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(addr), o);
    auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(std::string(addr)));
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    c10::intrusive_ptr<c10d::Backend> nccl;
#ifdef GENECIS_NCCL
    if (torch::cuda::is_available()) {
      auto nopts = c10d::ProcessGroupNCCL::Options::create();
      nopts->timeout = std::chrono::milliseconds(timeout_ms);
      auto prefixed = c10::make_intrusive<c10d::PrefixStore>("nccl", store);
      nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, world, nopts);
    }
#endif
    return new gc_pg{store, gloo, nccl, rank, world};
  } catch (const std::exception &e) {
    set_err(err, errlen, e.what());
    return nullptr;
  }
}

void gc_free(gc_pg *g) { delete g; }

// In place: every rank's tensor becomes the sum over ranks.
int gc_all_reduce_sum(gc_pg *g, at::Tensor *t, char *err, int errlen) {
  GC_TRY({
    std::vector<at::Tensor> v = {*t};
    g->pg(*t).allreduce(v)->wait();
  })
}

// Every rank's tensor, concatenated along dim 0 in rank order, as a new tensor.
int gc_all_gather_cat(gc_pg *g, const at::Tensor *t, at::Tensor **out, char *err, int errlen) {
  GC_TRY({
    std::vector<at::Tensor> in = {t->contiguous()};
    std::vector<std::vector<at::Tensor>> outs(1);
    for (int r = 0; r < g->world; r++) outs[0].push_back(torch::empty_like(in[0]));
    g->pg(in[0]).allgather(outs, in)->wait();
    *out = new at::Tensor(torch::cat(outs[0], 0));
  })
}

// In place: every rank's tensor becomes `root`'s.
int gc_broadcast(gc_pg *g, at::Tensor *t, int root, char *err, int errlen) {
  GC_TRY({
    std::vector<at::Tensor> v = {*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    g->pg(*t).broadcast(v, o)->wait();
  })
}

int gc_barrier(gc_pg *g, char *err, int errlen) {
  GC_TRY({ g->gloo->barrier()->wait(); })
}

// A key-value pair in the rendezvous store, for signals that may come
// long after the last collective (no collective timeout applies).
int gc_store_set(gc_pg *g, const char *key, const char *value, char *err, int errlen) {
  GC_TRY({
    std::string v(value);
    g->store->set(std::string(key), std::vector<uint8_t>(v.begin(), v.end()));
  })
}

// 1 and the value (NUL-terminated, cut to outlen) when `key` is set, 0
// when not yet, -1 when the store cannot be reached (its server, rank 0,
// is gone).
int gc_store_try_get(gc_pg *g, const char *key, char *out, int outlen, char *err, int errlen) {
  try {
    if (!g->store->check({std::string(key)})) return 0;
    auto v = g->store->get(std::string(key));
    set_err(out, outlen, std::string(v.begin(), v.end()));
    return 1;
  } catch (const std::exception &e) {
    set_err(err, errlen, e.what());
    return -1;
  }
}

}  // extern "C"
