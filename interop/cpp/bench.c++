// bench: the C++ reference side of `captp bench` (internal/bench). Both
// the client and the server are the Cap'n Proto C++ library (libcapnp
// 0.9.2), so the figures measure the reference implementation alone.
//
//   bench local pipe|socketpair   client and server in this process, one
//                                 event loop: kj::newTwoWayPipe() (memory)
//                                 or a Unix socketpair
//   bench serve ADDRESS           serve Test on ADDRESS (unix:/path...);
//                                 prints "listening" once bound
//   bench client ADDRESS          connect to a bench server
//
// Commands arrive on stdin, one per line, and each gets one reply line on
// stdout: "ok key=value ..." or "error message".
//
//   lat N SIZE         N sequential echo calls with SIZE payload bytes:
//                      elapsed_ns median_ns p99_ns
//   flight N K SIZE    N echo calls, K in flight: elapsed_ns
//   pipe2 N            N sequential child("x").echo(16 bytes), the echo
//                      pipelined on the child promise: elapsed_ns median_ns
//                      p99_ns
//   stats              nothing run
//
// Every reply also carries this process's counters: mallocs and
// alloc_bytes (every malloc/calloc/realloc, counted by interposing them)
// and cpu_ns (getrusage user+system). The server (serve) answers only
// "stats", and stays serving until stdin closes.

#include "test.capnp.h"

#include <capnp/message.h>
#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <kj/debug.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <string>
#include <vector>

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

// ---- allocation counting --------------------------------------------------

// glibc's own entry points; the definitions below interpose the public
// names for this program and every library it loads.
extern "C" {
void* __libc_malloc(size_t);
void* __libc_calloc(size_t, size_t);
void* __libc_realloc(void*, size_t);
void __libc_free(void*);
}

namespace {
// The program is single-threaded (one kj event loop).
unsigned long long gMallocs = 0;
unsigned long long gAllocBytes = 0;
}  // namespace

extern "C" void* malloc(size_t n) {
  ++gMallocs;
  gAllocBytes += n;
  return __libc_malloc(n);
}
extern "C" void* calloc(size_t count, size_t size) {
  ++gMallocs;
  gAllocBytes += count * size;
  return __libc_calloc(count, size);
}
extern "C" void* realloc(void* p, size_t n) {
  ++gMallocs;
  gAllocBytes += n;
  return __libc_realloc(p, n);
}
extern "C" void free(void* p) { __libc_free(p); }

namespace {

int64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t cpuNs() {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  auto tv = [](const struct timeval& t) { return int64_t(t.tv_sec) * 1000000000 + int64_t(t.tv_usec) * 1000; };
  return tv(ru.ru_utime) + tv(ru.ru_stime);
}

void say(const char* format, ...) __attribute__((format(printf, 1, 2)));
void say(const char* format, ...) {
  va_list ap;
  va_start(ap, format);
  vfprintf(stdout, format, ap);
  va_end(ap);
  fputc('\n', stdout);
  fflush(stdout);
}

// counters is the suffix of every reply.
std::string counters() {
  char buf[160];
  snprintf(buf, sizeof(buf), "mallocs=%llu alloc_bytes=%llu cpu_ns=%lld", gMallocs, gAllocBytes,
           (long long)cpuNs());
  return buf;
}

// BenchImpl serves the three methods the benchmark calls.
class BenchImpl final: public Test::Server {
protected:
  kj::Promise<void> echo(EchoContext context) override {
    auto params = context.getParams();
    if (params.hasData()) context.getResults().setData(params.getData());
    return kj::READY_NOW;
  }

  kj::Promise<void> child(ChildContext context) override {
    context.getResults().setChild(kj::heap<BenchImpl>());
    return kj::READY_NOW;
  }

  kj::Promise<void> seq(SeqContext context) override {
    context.getResults().setN(context.getParams().getN());
    return kj::READY_NOW;
  }
};

struct Latencies {
  int64_t elapsed, median, p99;
};

Latencies summarize(std::vector<int64_t>& samples, int64_t elapsed) {
  std::sort(samples.begin(), samples.end());
  Latencies l{elapsed, 0, 0};
  if (!samples.empty()) {
    l.median = samples[samples.size() / 2];
    l.p99 = samples[std::min(samples.size() - 1, samples.size() * 99 / 100)];
  }
  return l;
}

void checkSize(size_t got, size_t want) {
  KJ_REQUIRE(got == want, "echo returned the wrong size", got, want);
}

Latencies runLat(Test::Client& boot, kj::WaitScope& ws, size_t n, size_t size) {
  std::vector<kj::byte> payload(size, 'x');
  std::vector<int64_t> samples;
  samples.reserve(n);
  int64_t start = nowNs();
  for (size_t i = 0; i < n; i++) {
    int64_t t = nowNs();
    auto req = boot.echoRequest();
    req.setData(kj::arrayPtr(payload.data(), payload.size()));
    auto resp = req.send().wait(ws);
    checkSize(resp.getData().size(), size);
    samples.push_back(nowNs() - t);
  }
  return summarize(samples, nowNs() - start);
}

int64_t runFlight(Test::Client& boot, kj::WaitScope& ws, size_t n, size_t k, size_t size) {
  std::vector<kj::byte> payload(size, 'x');
  auto issue = [&]() {
    auto req = boot.echoRequest();
    req.setData(kj::arrayPtr(payload.data(), payload.size()));
    return req.send();
  };
  std::deque<capnp::RemotePromise<Test::EchoResults>> ring;
  int64_t start = nowNs();
  size_t issued = 0;
  while (issued < n && ring.size() < k) {
    ring.push_back(issue());
    issued++;
  }
  for (size_t done = 0; done < n; done++) {
    auto p = kj::mv(ring.front());
    ring.pop_front();
    auto resp = p.wait(ws);
    checkSize(resp.getData().size(), size);
    if (issued < n) {
      ring.push_back(issue());
      issued++;
    }
  }
  return nowNs() - start;
}

Latencies runPipe2(Test::Client& boot, kj::WaitScope& ws, size_t n) {
  std::vector<kj::byte> payload(16, 'x');
  std::vector<int64_t> samples;
  samples.reserve(n);
  int64_t start = nowNs();
  for (size_t i = 0; i < n; i++) {
    int64_t t = nowNs();
    auto creq = boot.childRequest();
    creq.setName("x");
    auto child = creq.send();
    auto ereq = child.getChild().echoRequest();
    ereq.setData(kj::arrayPtr(payload.data(), payload.size()));
    auto resp = ereq.send().wait(ws);
    checkSize(resp.getData().size(), 16);
    samples.push_back(nowNs() - t);
  }
  return summarize(samples, nowNs() - start);
}

// commandLoop runs client commands from stdin until it closes.
void commandLoop(Test::Client& boot, kj::WaitScope& ws) {
  char line[256];
  while (fgets(line, sizeof(line), stdin) != nullptr) {
    char cmd[32] = "";
    unsigned long a = 0, b = 0, c = 0;
    int got = sscanf(line, "%31s %lu %lu %lu", cmd, &a, &b, &c);
    if (got < 1) continue;
    try {
      if (strcmp(cmd, "lat") == 0 && got == 3) {
        auto l = runLat(boot, ws, a, b);
        say("ok elapsed_ns=%lld median_ns=%lld p99_ns=%lld %s", (long long)l.elapsed,
            (long long)l.median, (long long)l.p99, counters().c_str());
      } else if (strcmp(cmd, "flight") == 0 && got == 4) {
        auto e = runFlight(boot, ws, a, b, c);
        say("ok elapsed_ns=%lld %s", (long long)e, counters().c_str());
      } else if (strcmp(cmd, "pipe2") == 0 && got == 2) {
        auto l = runPipe2(boot, ws, a);
        say("ok elapsed_ns=%lld median_ns=%lld p99_ns=%lld %s", (long long)l.elapsed,
            (long long)l.median, (long long)l.p99, counters().c_str());
      } else if (strcmp(cmd, "stats") == 0) {
        say("ok %s", counters().c_str());
      } else {
        line[strcspn(line, "\n")] = 0;
        say("error unknown command: %s", line);
      }
    } catch (const kj::Exception& e) {
      auto s = kj::str(e.getDescription());
      for (char& ch: s) if (ch == '\n') ch = ' ';
      say("error %s", s.cStr());
    }
  }
}

// LineReader reads stdin on the event loop, so the server keeps serving
// while it waits for a command.
class LineReader {
public:
  explicit LineReader(kj::Own<kj::AsyncInputStream> in): in(kj::mv(in)) {}

  kj::Promise<void> loop() {
    return in->tryRead(buf, 1, sizeof(buf)).then([this](size_t n) -> kj::Promise<void> {
      if (n == 0) return kj::READY_NOW;
      for (size_t i = 0; i < n; i++) {
        if (buf[i] != '\n') {
          pending.push_back(buf[i]);
          continue;
        }
        if (pending == "stats") {
          say("ok %s", counters().c_str());
        } else {
          say("error unknown command: %s", pending.c_str());
        }
        pending.clear();
      }
      return loop();
    });
  }

private:
  kj::Own<kj::AsyncInputStream> in;
  char buf[256];
  std::string pending;
};

int usage(const char* argv0) {
  fprintf(stderr, "usage: %s local pipe|socketpair | serve ADDRESS | client ADDRESS\n", argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return usage(argv[0]);
  std::string mode = argv[1];
  try {
    auto io = kj::setupAsyncIo();
    auto& ws = io.waitScope;
    if (mode == "local") {
      std::string transport = argv[2];
      kj::TwoWayPipe pipe;
      if (transport == "pipe") {
        pipe = kj::newTwoWayPipe();
      } else if (transport == "socketpair") {
        pipe = io.provider->newTwoWayPipe();
      } else {
        return usage(argv[0]);
      }
      capnp::TwoPartyClient server(*pipe.ends[0], kj::heap<BenchImpl>(),
                                   capnp::rpc::twoparty::Side::SERVER);
      capnp::TwoPartyClient client(*pipe.ends[1]);
      auto boot = client.bootstrap().castAs<Test>();
      say("ready");
      commandLoop(boot, ws);
    } else if (mode == "client") {
      auto addr = io.provider->getNetwork().parseAddress(argv[2]).wait(ws);
      auto conn = addr->connect().wait(ws);
      capnp::TwoPartyClient client(*conn);
      auto boot = client.bootstrap().castAs<Test>();
      say("ready");
      commandLoop(boot, ws);
    } else if (mode == "serve") {
      auto addr = io.provider->getNetwork().parseAddress(argv[2]).wait(ws);
      auto listener = addr->listen();
      capnp::TwoPartyServer server(kj::heap<BenchImpl>());
      say("listening");
      LineReader in(io.lowLevelProvider->wrapInputFd(STDIN_FILENO));
      in.loop().exclusiveJoin(server.listen(*listener)).wait(ws);
    } else {
      return usage(argv[0]);
    }
  } catch (const kj::Exception& e) {
    fprintf(stderr, "bench: %s\n", kj::str(e).cStr());
    return 1;
  }
  return 0;
}
