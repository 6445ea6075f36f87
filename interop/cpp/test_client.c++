// test_client: exercises a Test server (captp's Go server in the interop
// tests) with the Cap'n Proto C++ reference implementation.
//
//   test_client ADDRESS SCENARIO...
//
// ADDRESS is anything kj::Network parses ("unix:/path", "127.0.0.1:4000").
// Each scenario prints what it observed as lines on stdout and ends with
// "PASS NAME"; on the first failure the program prints "FAIL NAME: WHY"
// and exits with status 1. Scenarios: echo caps pipeline embargo
// exceptions cancel unimplemented release (see the functions below).
//
// Synchronisation with the Go test: a scenario that needs the Go side to
// check something while the connection is still open prints
// "SYNC TAG" and waits for a line on stdin: "ok" continues, anything else
// fails the scenario with that text. The event loop keeps serving RPC
// while it waits. After the last scenario the program checks that the
// server released every capability the client exported to it.

#include "control.h"
#include "test_impl.h"

#include <capnp/ez-rpc.h>
#include <kj/async-io.h>
#include <kj/debug.h>
#include <kj/timer.h>

#include <stdio.h>
#include <string.h>
#include <unistd.h>

using captp_interop::counters;
using captp_interop::say;
using captp_interop::TestImpl;

namespace {

struct Env {
  kj::WaitScope& ws;
  kj::Timer& timer;
  captp_interop::LineReader& in;
  Test::Client boot;
};

// check fails the scenario when cond is false.
void check(bool cond, kj::StringPtr what) {
  if (!cond) kj::throwFatalException(KJ_EXCEPTION(FAILED, what));
}

// oneLine makes a description printable on one line.
kj::String oneLine(kj::StringPtr s) {
  kj::Vector<char> out;
  for (char c: s) {
    if (c == '\n') {
      out.addAll(kj::StringPtr("\\n"));
    } else {
      out.add(c);
    }
  }
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

const char* typeName(kj::Exception::Type t) {
  switch (t) {
    case kj::Exception::Type::FAILED: return "failed";
    case kj::Exception::Type::OVERLOADED: return "overloaded";
    case kj::Exception::Type::DISCONNECTED: return "disconnected";
    case kj::Exception::Type::UNIMPLEMENTED: return "unimplemented";
  }
  return "unknown";
}

// expectException waits for p and returns the exception it must end with.
template <typename T>
kj::Exception expectException(Env& env, kj::Promise<T>&& p, kj::StringPtr what) {
  kj::Maybe<kj::Exception> caught;
  try {
    p.wait(env.ws);
  } catch (const kj::Exception& e) {
    caught = e;
  }
  KJ_IF_MAYBE(e, caught) { return kj::mv(*e); }
  kj::throwFatalException(KJ_EXCEPTION(FAILED, "expected an exception", what));
}

// waitUntil runs the event loop until cond holds or 10 seconds pass.
template <typename Cond>
void waitUntil(Env& env, Cond&& cond, kj::StringPtr what) {
  for (int i = 0; i < 2000; i++) {
    if (cond()) return;
    env.timer.afterDelay(5 * kj::MILLISECONDS).wait(env.ws);
  }
  kj::throwFatalException(KJ_EXCEPTION(FAILED, "timed out waiting", what));
}

// sync lets the Go test check the server side while the connection is up.
void sync(Env& env, kj::StringPtr tag) {
  say("SYNC %s", tag.cStr());
  auto line = env.in.readLine().wait(env.ws);
  KJ_IF_MAYBE(l, line) {
    if (*l == "ok") return;
    kj::throwFatalException(KJ_EXCEPTION(FAILED, "Go test", tag, *l));
  }
  kj::throwFatalException(KJ_EXCEPTION(FAILED, "stdin closed during sync", tag));
}

kj::Array<capnp::byte> pattern(size_t n) {
  auto a = kj::heapArray<capnp::byte>(n);
  for (size_t i = 0; i < n; i++) a[i] = static_cast<capnp::byte>(i * 7 + n);
  return a;
}

Test::Client newLocal(kj::StringPtr name, TestImpl** raw = nullptr) {
  auto obj = kj::heap<TestImpl>(name);
  if (raw != nullptr) *raw = obj.get();
  return Test::Client(kj::mv(obj));
}

// echo: null stays null, empty stays empty, 16 bytes and 1 MiB round-trip.
void scenarioEcho(Env& env) {
  {
    auto resp = env.boot.echoRequest().send().wait(env.ws);
    check(!resp.hasData(), "echo(null) returned non-null data");
    say("echo null -> null");
  }
  {
    auto req = env.boot.echoRequest();
    req.initData(0);
    auto resp = req.send().wait(env.ws);
    check(resp.hasData(), "echo(empty) returned null data");
    check(resp.getData().size() == 0, "echo(empty) returned bytes");
    say("echo empty -> empty");
  }
  for (size_t n: {size_t(16), size_t(1) << 20}) {
    auto want = pattern(n);
    auto req = env.boot.echoRequest(capnp::MessageSize{n / 8 + 16, 0});
    req.setData(want);
    auto resp = req.send().wait(env.ws);
    check(resp.hasData(), "echo returned null data");
    auto got = resp.getData();
    check(got.size() == n, kj::str("echo of ", n, " bytes returned ", got.size()));
    check(memcmp(got.begin(), want.begin(), n) == 0, "echo returned different bytes");
    say("echo %zu bytes -> %zu bytes, equal", n, got.size());
  }
}

// caps: capabilities both ways. The client's own object goes to the server
// as a parameter and is called back; it is held by the server and comes
// back; a server object comes to the client. At the end the server must
// have released the client's object.
void scenarioCaps(Env& env) {
  {
    TestImpl* local;
    Test::Client localCap = newLocal("client-local", &local);
    auto echoes0 = counters.echoes;

    auto cb = env.boot.callBackRequest();
    cb.setCb(localCap);
    cb.setData(kj::StringPtr("ping").asBytes());
    auto resp = cb.send().wait(env.ws);
    check(resp.hasData() && kj::heapString(resp.getData().asChars()) == "ping",
          "callBack did not return ping");
    check(counters.echoes == echoes0 + 1, "callBack did not call the client's object");
    say("callBack -> ping, served by the client's own object");

    auto hold = env.boot.holdRequest();
    hold.setCap(localCap);
    hold.send().wait(env.ws);
    auto back = env.boot.getHeldRequest().send().wait(env.ws).getCap();
    auto name = back.nameRequest().send().wait(env.ws);
    check(name.getName() == "client-local",
          kj::str("getHeld returned ", name.getName(), ", not client-local"));
    back.echoRequest().send().wait(env.ws);
    check(counters.echoes == echoes0 + 2, "the returned capability is not the client's object");
    say("hold/getHeld -> client-local, the client's own object");

    // Pipelined on getHeld's result: the server receives the call and must
    // forward it back to us.
    auto fwd = env.boot.getHeldRequest().send().getCap().echoRequest().send().wait(env.ws);
    check(!fwd.hasData(), "forwarded echo(null) returned data");
    check(counters.echoes == echoes0 + 3, "the forwarded call did not reach the client's object");
    say("getHeld().echo(), pipelined -> forwarded back to the client's own object");

    auto child = env.boot.childRequest();
    child.setName("from-server");
    auto childCap = child.send().wait(env.ws).getChild();
    auto childName = childCap.nameRequest().send().wait(env.ws).getName();
    check(childName == "from-server", "child has the wrong name");
    say("child -> from-server, a server object");

    env.boot.dropHeldRequest().send().wait(env.ws);
  }
  waitUntil(env, []() { return counters.live == 0; },
            "the server to release the client's object");
  say("server released the client's object");
}

// pipeline: child("a").child("b").child("c").name() sent before any answer.
void scenarioPipeline(Env& env) {
  auto r1 = env.boot.childRequest();
  r1.setName("a");
  auto p1 = r1.send();
  auto r2 = p1.getChild().childRequest();
  r2.setName("b");
  auto p2 = r2.send();
  auto r3 = p2.getChild().childRequest();
  r3.setName("c");
  auto p3 = r3.send();
  auto n3 = p3.getChild().nameRequest().send();
  auto n1 = p1.getChild().nameRequest().send();
  auto name3 = n3.wait(env.ws);
  auto name1 = n1.wait(env.ws);
  check(name3.getName() == "c", kj::str("pipelined chain returned ", name3.getName()));
  check(name1.getName() == "a", kj::str("first child is ", name1.getName()));
  say("pipeline child(a).child(b).child(c).name() -> %s", name3.getName().cStr());
}

// embargo: calls on a promise that resolves to the client's own object,
// made before, during and after the resolution, arrive in order.
void scenarioEmbargo(Env& env) {
  {
    TestImpl* local;
    Test::Client localCap = newLocal("client-local", &local);
    Test::Client p = env.boot.promiseRequest().send().getCap();
    const uint32_t n = 60;
    kj::Vector<kj::Promise<void>> calls;
    auto seq = [&](uint32_t i) {
      auto req = p.seqRequest();
      req.setN(i);
      calls.add(req.send().then([i](capnp::Response<Test::SeqResults>&& r) {
        check(r.getN() == i, "seq returned the wrong number");
      }));
    };
    for (uint32_t i = 0; i < n / 3; i++) seq(i);
    auto resolve = env.boot.resolvePromiseRequest();
    resolve.setCap(localCap);
    calls.add(resolve.send().ignoreResult());
    for (uint32_t i = n / 3; i < 2 * n / 3; i++) seq(i);
    kj::joinPromises(calls.releaseAsArray()).wait(env.ws);
    for (uint32_t i = 2 * n / 3; i < n; i++) seq(i);
    kj::joinPromises(calls.releaseAsArray()).wait(env.ws);

    auto log = local->getLog();
    check(log.size() == n, kj::str("the client's object saw ", log.size(), " calls, want ", n));
    for (uint32_t i = 0; i < n; i++) {
      check(log[i] == i, kj::str("call ", i, " arrived as number ", log[i], ": ",
                                 kj::strArray(log, ",")));
    }
    say("embargo: %u calls through a promise resolved to the client's own object arrived in order",
        n);
  }
  // No release check here: the Go Test object keeps a settled promise's
  // resolution until it shuts down (see internal/testimpl), so the
  // client's object stays referenced until the connection ends.
}

// exceptions: each type, with its reason, and a broken promise.
void scenarioExceptions(Env& env) {
  struct Kind {
    ExceptionKind kind;
    kj::Exception::Type type;
    const char* name;
  };
  const Kind kinds[] = {
      {ExceptionKind::FAILED, kj::Exception::Type::FAILED, "failed"},
      {ExceptionKind::OVERLOADED, kj::Exception::Type::OVERLOADED, "overloaded"},
      {ExceptionKind::DISCONNECTED, kj::Exception::Type::DISCONNECTED, "disconnected"},
      {ExceptionKind::UNIMPLEMENTED, kj::Exception::Type::UNIMPLEMENTED, "unimplemented"},
  };
  for (auto& k: kinds) {
    auto reason = kj::str("reason for ", k.name, ": caf\xc3\xa9 \xe2\x9c\x93");
    auto req = env.boot.failRequest();
    req.setKind(k.kind);
    req.setReason(reason);
    auto e = expectException(env, req.send(), k.name);
    say("exception %s type=%s description=%s", k.name, typeName(e.getType()),
        oneLine(e.getDescription()).cStr());
    check(e.getType() == k.type, kj::str("fail(", k.name, ") raised ", typeName(e.getType())));
    check(strstr(e.getDescription().cStr(), reason.cStr()) != nullptr,
          "the description lost the reason");
  }
  {
    Test::Client p = env.boot.promiseRequest().send().getCap();
    auto call = p.nameRequest().send();
    auto brk = env.boot.breakPromiseRequest();
    brk.setReason("broken on purpose");
    brk.send().wait(env.ws);
    auto e = expectException(env, kj::mv(call), "call on a broken promise");
    say("exception broken-promise type=%s description=%s", typeName(e.getType()),
        oneLine(e.getDescription()).cStr());
    check(e.getType() == kj::Exception::Type::FAILED, "broken promise raised the wrong type");
    check(strstr(e.getDescription().cStr(), "broken on purpose") != nullptr,
          "the description lost the reason");
  }
}

// cancel: dropping the promise of a block() call sends Finish, which must
// cancel the call on the server; the Go test checks that while the
// connection stays open. The echoes go to a child: an object may hold
// its later calls while block() runs (captp's native objects do).
void scenarioCancel(Env& env) {
  auto childReq = env.boot.childRequest();
  childReq.setName("bystander");
  auto bystander = childReq.send().wait(env.ws).getChild();
  {
    auto blocked = env.boot.blockRequest().send();
    // Messages on one connection are handled in order: once this
    // returns, the server has received block().
    bystander.echoRequest().send().wait(env.ws);
    sync(env, "block-started");
  }
  // The Finish was queued before this call, so it has been sent when the
  // answer arrives.
  bystander.echoRequest().send().wait(env.ws);
  sync(env, "block-cancelled");
}

// unimplemented: a method number Test lacks, and an interface the object
// does not implement.
void scenarioUnimplemented(Env& env) {
  {
    auto req = env.boot.typelessRequest(capnp::typeId<Test>(), 200, nullptr);
    auto e = expectException(env, req.send(), "unknown method");
    say("unknown method type=%s description=%s", typeName(e.getType()),
        oneLine(e.getDescription()).cStr());
    check(e.getType() == kj::Exception::Type::UNIMPLEMENTED, "unknown method: wrong type");
  }
  {
    auto req = env.boot.typelessRequest(0xa1b2c3d4e5f60718ull, 0, nullptr);
    auto e = expectException(env, req.send(), "unknown interface");
    say("unknown interface type=%s description=%s", typeName(e.getType()),
        oneLine(e.getDescription()).cStr());
    check(e.getType() == kj::Exception::Type::UNIMPLEMENTED, "unknown interface: wrong type");
  }
  // The connection still works.
  env.boot.echoRequest().send().wait(env.ws);
}

// release: take many references both ways, drop them all, and let the Go
// test check (while connected) that only the bootstrap object is left.
void scenarioRelease(Env& env) {
  {
    Test::Client localCap = newLocal("client-local");
    auto r1 = env.boot.childRequest();
    r1.setName("r1");
    auto p1 = r1.send();
    auto r2 = p1.getChild().childRequest();
    r2.setName("r2");
    auto p2 = r2.send();
    Test::Client c2 = p2.getChild();
    c2.nameRequest().send().wait(env.ws);

    // A promise that breaks. (One that resolves would stay referenced by
    // the Go Test object until it shuts down, see internal/testimpl.)
    Test::Client prom = env.boot.promiseRequest().send().getCap();
    auto brk = env.boot.breakPromiseRequest();
    brk.setReason("released");
    brk.send().wait(env.ws);
    expectException(env, prom.nameRequest().send(), "call on a broken promise");

    auto hold = env.boot.holdRequest();
    hold.setCap(localCap);
    hold.send().wait(env.ws);
    Test::Client back = env.boot.getHeldRequest().send().wait(env.ws).getCap();
    back.nameRequest().send().wait(env.ws);

    auto cb = c2.callBackRequest();
    cb.setCb(localCap);
    cb.send().wait(env.ws);
    env.boot.dropHeldRequest().send().wait(env.ws);
  }
  // Release and Finish messages for everything above are queued before
  // this call.
  env.boot.echoRequest().send().wait(env.ws);
  waitUntil(env, []() { return counters.live == 0; },
            "the server to release the client's object");
  sync(env, "released");
}

struct Scenario {
  const char* name;
  void (*run)(Env&);
};

const Scenario scenarios[] = {
    {"echo", scenarioEcho},
    {"caps", scenarioCaps},
    {"pipeline", scenarioPipeline},
    {"embargo", scenarioEmbargo},
    {"exceptions", scenarioExceptions},
    {"cancel", scenarioCancel},
    {"unimplemented", scenarioUnimplemented},
    {"release", scenarioRelease},
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s ADDRESS SCENARIO...\nscenarios:", argv[0]);
    for (auto& s: scenarios) fprintf(stderr, " %s", s.name);
    fprintf(stderr, "\n");
    return 2;
  }
  capnp::EzRpcClient client(argv[1]);
  captp_interop::LineReader in(client.getLowLevelIoProvider().wrapInputFd(STDIN_FILENO));
  Env env{client.getWaitScope(), client.getIoProvider().getTimer(), in, client.getMain<Test>()};
  for (int i = 2; i < argc; i++) {
    const Scenario* found = nullptr;
    for (auto& s: scenarios) {
      if (strcmp(s.name, argv[i]) == 0) found = &s;
    }
    if (found == nullptr) {
      say("FAIL %s: no such scenario", argv[i]);
      return 2;
    }
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { found->run(env); })) {
      say("FAIL %s: %s", argv[i], oneLine(kj::str(*e)).cStr());
      return 1;
    }
    say("PASS %s", argv[i]);
  }
  return 0;
}
