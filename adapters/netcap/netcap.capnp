@0xcbbeac953d8c2166;
# Network capabilities for guests: a host offers a Network restricted by a
# policy; a guest reaches only the addresses and ports it was given. Bytes
# move over core/bytestream's ByteStream in both directions, with flow
# control. Every request is answered; failures are typed results.

using Go = import "/go.capnp";
$Go.package("netcap");
$Go.import("github.com/captp-go/captp/adapters/netcap");

using BS = import "/core/bytestream/bytestream.capnp";

# Failure is a typed error, returned as a result rather than an exception.
struct Failure {
  kind @0 :Kind;
  # detail is a human-readable description from the host.
  detail @1 :Text;

  enum Kind {
    other @0;          # anything not listed below
    denied @1;         # the host's policy does not allow it
    refused @2;        # the destination refused the connection
    unreachable @3;    # no route to the destination or name not found
    timeout @4;        # the operation did not finish in time
    addressInUse @5;   # listen: the address is taken
    invalidAddress @6; # the network or address does not parse
    closed @7;         # the Network, Listener or Stream is closed
    limit @8;          # too many open streams or listeners
    reset @9;          # the peer reset the connection
    canceled @10;      # the caller canceled the request
  }
}

# Stream is an open connection. Bytes to the remote end go to `up`, bytes
# from it come to the ByteStream `down` the guest passed: end() there is
# the end of the remote's bytes, cleanly or not (see endReason).
# Releasing the last reference to the Stream closes the connection.
interface Stream {
  # close closes the connection. After the guest ended `up` the host has
  # written its bytes and a FIN: it stops sending to `down` and reads and
  # discards the remote's bytes until the remote's end of stream, for a
  # bounded time, so that closing does not reset the connection (a reset
  # can make the remote lose the guest's last bytes). Otherwise it closes
  # at once, and writes in flight may be lost.
  close @0 ();
  # endReason says why the host ended `down`: the remote's clean end of
  # stream, or a failure such as a reset. Call it after down.end().
  endReason @1 () -> (reason :EndReason);
}

struct EndReason {
  union {
    eof @0 :Void;         # the remote ended its direction cleanly
    failure @1 :Failure;  # the stream failed
    open @2 :Void;        # down has not ended yet
  }
}

# Connection is an established stream and its two ends.
struct Connection {
  stream @0 :Stream;
  # up carries bytes to the remote end; end() half-closes (sends FIN).
  up @1 :BS.ByteStream;
  localAddress @2 :Text;
  remoteAddress @3 :Text;
}

struct ConnectResult {
  union {
    failure @0 :Failure;
    connection @1 :Connection;
  }
}

# Listener accepts connections on an address the policy allows.
# Releasing the last reference to it closes it.
interface Listener {
  # accept waits for the next connection, without a time limit; canceling
  # the call (or closing the Listener) ends the wait. The connection's
  # bytes go to down.
  accept @0 (down :BS.ByteStream) -> (result :ConnectResult);
  # close stops listening; pending accepts return error `closed`.
  close @1 ();
}

struct ListenResult {
  union {
    failure @0 :Failure;
    listener @1 :Listening;
  }
}

struct Listening {
  listener @0 :Listener;
  # address is where it listens, with the port chosen if port 0 was asked.
  address @1 :Text;
}

# Network opens streams and listeners. network is "tcp", "tcp4" or "tcp6";
# address is host:port, where host may be a name the host resolves (its
# addresses are checked against the policy after resolution).
interface Network {
  connect @0 (network :Text, address :Text, down :BS.ByteStream) -> (result :ConnectResult);
  listen @1 (network :Text, address :Text) -> (result :ListenResult);
}
