// test_server: serves the Test interface (test_impl.h) with the Cap'n Proto
// C++ reference implementation, for captp's interop tests.
//
//   test_server ADDRESS
//
// ADDRESS is anything kj::Network parses: "unix:/path/to.sock",
// "127.0.0.1:0", "127.0.0.1:4000". The bootstrap capability is a Test
// object named "server".
//
// Protocol on stdout/stdin, one line each:
//
//   listening PORT            printed once the socket is bound (PORT is 0
//                             for a Unix socket)
//   stdin "stats"        ->   "stats live=L started=S cancelled=C echoes=E"
//                             L: Test objects alive (the bootstrap object
//                             counts, so the baseline is 1); S, C: block()
//                             calls started and cancelled; E: echo() calls
//   stdin "ping"         ->   "pong"
//   stdin EOF                 the program exits with status 0
//
// Reading stdin happens on the RPC event loop, so a reply reflects every
// message the server has processed before it.

#include "control.h"
#include "test_impl.h"

#include <capnp/ez-rpc.h>
#include <kj/async-io.h>
#include <kj/debug.h>

#include <stdio.h>
#include <unistd.h>

using captp_interop::counters;
using captp_interop::say;

namespace {

kj::Promise<void> controlLoop(captp_interop::LineReader& in) {
  return in.readLine().then([&in](kj::Maybe<kj::String> line) -> kj::Promise<void> {
    KJ_IF_MAYBE(l, line) {
      if (*l == "stats") {
        say("stats live=%lld started=%lld cancelled=%lld echoes=%lld",
            (long long)counters.live, (long long)counters.blockStarted,
            (long long)counters.blockCancelled, (long long)counters.echoes);
      } else if (*l == "ping") {
        say("pong");
      } else {
        say("error unknown command %s", l->cStr());
      }
      return controlLoop(in);
    }
    return kj::READY_NOW;  // stdin closed: the test is done with us
  });
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s ADDRESS   (unix:/path or host:port)\n", argv[0]);
    return 2;
  }
  try {
    capnp::EzRpcServer server(kj::heap<captp_interop::TestImpl>("server"), argv[1]);
    auto& ws = server.getWaitScope();
    unsigned port = server.getPort().wait(ws);
    say("listening %u", port);
    captp_interop::LineReader in(server.getLowLevelIoProvider().wrapInputFd(STDIN_FILENO));
    controlLoop(in).wait(ws);
  } catch (const kj::Exception& e) {
    fprintf(stderr, "test_server: %s\n", kj::str(e).cStr());
    return 1;
  }
  return 0;
}
