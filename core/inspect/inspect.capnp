@0xd72d31996e4851cb;
# Inspection of a running vat: its connections and their tables, the
# leak-hunting view (captp inspect). A vat serves an Inspector only if it
# opts in; whoever holds the capability may read the tables, so hand it out
# like any other secret (captp serve -inspect makes it a sturdy ref).

using Go = import "/go.capnp";
$Go.package("inspect");
$Go.import("github.com/captp-go/captp/core/inspect");

interface Inspector {
  # vat describes the vat as a whole.
  vat @0 () -> (info :VatInfo);

  # connections describes each tracked connection, oldest first, listing
  # at most maxEntries entries per table (0: the inspector's default).
  connections @1 (maxEntries :UInt32) -> (conns :List(Connection));
}

struct VatInfo {
  name @0 :Text;
  # Times in nanoseconds since the Unix epoch, by the vat's clock.
  startedAt @1 :Int64;
  now @2 :Int64;
  # Connections tracked now; dropped counts connections not tracked
  # because the registry was full.
  connections @3 :UInt32;
  dropped @4 :UInt64;
  # Level 3, when the vat has a core.Vat: provisions kept for third
  # parties and Accepts that arrived before their Provide.
  level3 @5 :Bool;
  provisions @6 :UInt32;
  earlyAccepts @7 :UInt32;
}

struct Connection {
  id @0 :UInt64;      # the registry's number, in order of tracking
  label @1 :Text;     # who the peer is, as the vat knows it
  since @2 :Int64;    # when it was tracked (ns since the Unix epoch)
  closing @3 :Bool;
  err @4 :Text;

  # Table sizes (the lists below may be cut at maxEntries).
  questionCount @5 :UInt32;
  answerCount @6 :UInt32;
  importCount @7 :UInt32;
  exportCount @8 :UInt32;
  embargoCount @9 :UInt32;

  queuedBytes @10 :UInt64;
  inboundHeldBytes @11 :UInt64;
  inProgress @12 :UInt32;
  flowInFlight @13 :UInt64;
  flowPeak @14 :UInt64;
  flowWaiting @15 :UInt32;
  handoffs @16 :UInt32;

  questions @17 :List(Question);
  answers @18 :List(Answer);
  imports @19 :List(Import);
  exports @20 :List(Export);
  embargoes @21 :List(UInt32);
  provides @22 :List(Provide);
}

struct Question {
  id @0 :UInt32;
  returned @1 :Bool;
  finished @2 :Bool;
  released @3 :Bool;
  bootstrap @4 :Bool;
  method @5 :Text;
  interfaceId @6 :UInt64;
  methodId @7 :UInt16;
  pipelined @8 :UInt32;
}

struct Answer {
  id @0 :UInt32;
  returned @1 :Bool;
  finished @2 :Bool;
  queued @3 :UInt32;
  resultExports @4 :UInt32;
  argsBytes @5 :UInt64;
  provide @6 :Bool;
  accept @7 :Bool;
}

struct Import {
  id @0 :UInt32;
  refs @1 :UInt32;
  clients @2 :UInt32;
  promise @3 :Bool;
  resolved @4 :Bool;
  hasFlow @5 :Bool;
  flowWindow @6 :UInt64;
  flowInFlight @7 :UInt64;
}

struct Export {
  id @0 :UInt32;
  refs @1 :UInt32;
  promise @2 :Bool;
  resolved @3 :Bool;
  vine @4 :Bool;
  loopback @5 :Bool;
  what @6 :Text;
}

struct Provide {
  questionId @0 :UInt32;
  sent @1 :Bool;
}
