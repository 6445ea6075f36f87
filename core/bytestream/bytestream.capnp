@0xa21799fb3ba7962f;
# A byte stream carried over RPC: adapters and the host bridge use it to
# move streams of bytes between vats with flow control.

using Go = import "/go.capnp";
$Go.package("bytestream");
$Go.import("github.com/captp-go/captp/core/bytestream");

# ByteStream is the receiving end of a stream of bytes.
interface ByteStream {
  # write appends bytes to the stream. It is a streaming call: the caller
  # keeps several in flight, within its flow-control window, and an error
  # fails every later call.
  write @0 (bytes :Data) -> stream;

  # end says that no more bytes follow. It returns once every write before
  # it has been handled.
  end @1 ();
}
