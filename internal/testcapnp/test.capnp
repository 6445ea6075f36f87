@0xeb3b586becec2491;
# Schema used by captp's own tests, interop tests and the demo.

using Go = import "/go.capnp";
$Go.package("testcapnp");
$Go.import("github.com/captp-go/captp/internal/testcapnp");

enum ExceptionKind {
  failed @0;
  overloaded @1;
  disconnected @2;
  unimplemented @3;
}

# Test is one object of a test vat. Every method exists to exercise one
# part of the protocol.
interface Test {
  # echo returns its argument: payloads, null vs empty Data.
  echo @0 (data :Data) -> (data :Data);

  # fail throws an exception of the given kind with the given reason.
  fail @1 (kind :ExceptionKind, reason :Text) -> ();

  # block returns only when the call is cancelled (or the connection ends).
  block @2 () -> ();

  # child returns a new object: pipelined chains call child().child()...
  child @3 (name :Text) -> (child :Test);

  # name returns the object's name.
  name @4 () -> (name :Text);

  # callBack calls cb.echo(data) and returns what cb returned: a capability
  # passed in parameters and used by the receiver.
  callBack @5 (cb :Test, data :Data) -> (data :Data);

  # hold keeps a reference to cap until dropHeld.
  hold @6 (cap :Test) -> ();
  dropHeld @7 () -> ();

  # getHeld returns the held capability (possibly the caller's own object).
  getHeld @8 () -> (cap :Test);

  # promise returns a promise that settles when resolvePromise is called.
  promise @9 () -> (cap :Test);
  resolvePromise @10 (cap :Test) -> ();
  breakPromise @11 (reason :Text) -> ();

  # seq records n in the order calls arrive; log returns the record.
  seq @12 (n :UInt32) -> (n :UInt32);
  log @13 () -> (ns :List(UInt32));
}
