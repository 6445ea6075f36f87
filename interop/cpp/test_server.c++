// test_server: serves the Test interface (test_impl.h) with the Cap'n Proto
// C++ reference implementation (capnp::TwoPartyServer), for captp's interop
// tests.
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
//   stdin EOF                 every connection and object is torn down
//                             and the program exits with status 0
//
// Reading stdin happens on the RPC event loop, so a reply reflects every
// message the server has processed before it.

#include "control.h"
#include "test_impl.h"

#include <capnp/rpc-twoparty.h>
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
    // Declaration order is teardown order, reversed: everything that can
    // hold RPC state (connections, the bootstrap object and whatever it
    // holds) is destroyed while the event loop still exists.
    //
    // Not EzRpcServer: it destroys its event loop before the bootstrap
    // object, so when that object still holds a capability imported from
    // a client (hold() without dropHeld()), the client's connection state
    // outlives the loop and the loop's destructor fails ("EventLoop
    // destroyed with events still in the queue"), and we exit with 1.
    // EzRpcServer serves with the same TwoPartyVatNetwork and RpcSystem
    // as TwoPartyServer; only the ownership differs.
    auto io = kj::setupAsyncIo();
    auto& ws = io.waitScope;
    auto addr = io.provider->getNetwork().parseAddress(argv[1]).wait(ws);
    auto listener = addr->listen();
    capnp::TwoPartyServer server(kj::heap<captp_interop::TestImpl>("server"));
    say("listening %u", listener->getPort());
    captp_interop::LineReader in(io.lowLevelProvider->wrapInputFd(STDIN_FILENO));
    // Serve until stdin closes; listen() only ever ends with an error.
    controlLoop(in).exclusiveJoin(server.listen(*listener)).wait(ws);
  } catch (const kj::Exception& e) {
    fprintf(stderr, "test_server: %s\n", kj::str(e).cStr());
    return 1;
  }
  return 0;
}
